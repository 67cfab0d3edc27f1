"""The serving computation as a TFLite (LiteRT) flat buffer: float32, float16, dynamic-range or int8.

The flat buffer has one signature, ``serving_default``: ``images`` uint8 [B, H, W, 3] at a fixed
H and W (the batch may vary), the training normalisation inside, and the SavedModel's outputs by
name (``logits``, ``labels``, with ``probabilities`` when asked). Quantisation:

    float16  weights stored in float16, computed in float32 (half the file)
    dynamic  weights in int8, activations quantised on the fly (a quarter of the file)
    int8     weights and activations in int8, ranges calibrated on images of the training
             split (only TFLite's int8 built-in ops: what integer-only accelerators run)
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import tensorflow as tf

from segtrain.errors import SegtrainError
from segtrain.export.frozen import describe_ops, frozen_module

QUANTIZATIONS = ("float16", "dynamic", "int8")
MODEL_FILE = "model.tflite"

# What the converter says of an op it cannot take, where it gives a location: its type and the
# graph node it came from.
_OP_ERROR = re.compile(r"fused\[\"(\w+):\", \"([^\"@]+)@[^\n]*?(?:op is neither|failed to legalize|is not supported|"
                       r"not supported)")


def convert(serve: Callable, image_size: Sequence[int], quantize: str | None = None,
            calibration: Callable[[], Iterable[np.ndarray]] | None = None, layers: Iterable[str] = ()) -> bytes:
    """The flat buffer of ``serve`` (uint8 images -> named outputs) at ``image_size``.

    Args:
      serve: the SavedModel's ``serving_default`` function (segtrain.export.serving_functions).
      image_size: (height, width) of the input.
      quantize: None (float32) or one of QUANTIZATIONS.
      calibration: for int8, a function returning uint8 images [H, W, 3] of ``image_size``.
      layers: the model's layer names, to name the layer of an op the format cannot take.

    Raises:
      SegtrainError: an op TFLite cannot take (naming its layer), or int8 without calibration.
    """
    if quantize not in (None, *QUANTIZATIONS):
        raise SegtrainError(f"--quantize={quantize}: choose one of {', '.join(QUANTIZATIONS)} (or leave it out for "
                            f"float32).")
    height, width = (int(v) for v in image_size)
    given = serve.input_signature[0]  # the bands and sample type the model takes
    spec = tf.TensorSpec([None, height, width, given.shape[-1]], given.dtype, name="images")
    # The frozen function's outputs are a dict, so the flat buffer's signature keeps their names.
    module = frozen_module(serve, spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        if calibration is None:
            raise SegtrainError("--quantize=int8 needs calibration images (--calibration_images).")
        converter.representative_dataset = lambda: ({"images": np.asarray(image, given.dtype.as_numpy_dtype)[None]}
                                                    for image in calibration())
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        with warnings.catch_warnings():
            # int8 calibration runs TensorFlow's own (deprecated) interpreter inside the converter.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            return converter.convert()
    except Exception as e:  # ConverterError, and calibration's RuntimeError
        graph = module.serve.get_concrete_function().graph.as_graph_def()
        raise SegtrainError(conversion_error(str(e), quantize, layers, graph)) from None


def conversion_error(message: str, quantize: str | None, layers: Iterable[str], graph=None) -> str:
    """One line for a failed conversion: the layers and ops TFLite could not take.

    The converter names an op's graph node where it knows it; otherwise the op types it names
    are looked up in ``graph`` (the frozen GraphDef) to find their nodes.
    """
    what = "--format=tflite" + (f" --quantize={quantize}" if quantize else "")
    ops = _OP_ERROR.findall(message)
    if not ops and graph is not None:
        types = set(re.findall(r"'tf\.(\w+)' op", message))
        nodes = [*graph.node, *(node for f in graph.library.function for node in f.node_def)]
        ops = [(node.op, node.name) for node in nodes if node.op in types]
    if ops:
        return (f"{what}: TFLite's built-in ops cannot run {describe_ops(ops, layers)}; the export stops here, not "
                f"on the device. Export this model as --format=saved_model or --format=onnx"
                + (", or quantise less (--quantize=dynamic)" if quantize == "int8" else "") + ".")
    lines = [line.strip() for line in message.splitlines() if "error" in line.lower()]
    reason = lines[0] if lines else (message.strip().splitlines() or ["unknown reason"])[0]
    return f"{what}: the TFLite converter failed: {reason[:400]}"
