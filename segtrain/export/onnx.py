"""The serving computation as an ONNX model (tf2onnx), for ONNX Runtime, TensorRT and the like.

One input, ``images`` uint8 [B, H, W, 3] with B, H and W dynamic, the training normalisation
inside, and the SavedModel's outputs by name (``logits``, ``labels``, with ``probabilities``
when asked). The model's weights are folded into the graph.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Callable, Iterable

import tensorflow as tf

from segtrain.errors import SegtrainError

MODEL_FILE = "model.onnx"
DEFAULT_OPSET = 17
INSTALL = 'pip install "segtrain[onnx]"'

_UNSUPPORTED = re.compile(r"Tensorflow op \[(.+?): (\w+)\] is not supported")


def convert(serve: Callable, opset: int = DEFAULT_OPSET, layers: Iterable[str] = ()) -> bytes:
    """The serialised ONNX model of ``serve`` (uint8 images -> named outputs).

    Raises:
      SegtrainError: tf2onnx is not installed, or the model has ops ONNX cannot take (naming
        their layers).
    """
    tf2onnx = require("tf2onnx", "--format=onnx")
    from segtrain.export.frozen import describe_ops

    _register_handlers(tf2onnx)

    spec = serve.input_signature[0]  # IMAGES_INPUT, or the bands the model takes
    function = tf.function(lambda images: serve(images), input_signature=[spec], autograph=False)
    with _tf2onnx_log() as records:
        try:
            proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=opset)
        except Exception as e:  # tf2onnx raises what its handlers raise
            raise SegtrainError(f"--format=onnx: tf2onnx could not convert the model (opset {opset}): "
                                f"{str(e).strip().splitlines()[0][:400]}") from None
    unsupported = [(m.group(2), m.group(1)) for m in map(_UNSUPPORTED.search, records) if m]
    if unsupported:
        raise SegtrainError(f"--format=onnx: ONNX opset {opset} has no conversion for {describe_ops(unsupported, layers)};"
                            f" the export stops here, not at load time. Export this model as --format=saved_model, "
                            f"or try a newer --opset.")
    return proto.SerializeToString()


_registered = False


def _register_handlers(tf2onnx) -> None:
    """Conversions tf2onnx lacks for ops segtrain's models use: Erfc (the exact GELU of SegFormer's
    Mix-FFN, ``tf.nn.gelu``) as 1 - Erf, which ONNX has since opset 9."""
    global _registered
    if _registered:
        return
    import numpy as np
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            x = node.input[0]
            dtype = ctx.get_dtype(x)
            erf = ctx.make_node("Erf", [x], op_name_scope=node.name, shapes=[ctx.get_shape(x)], dtypes=[dtype])
            one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, utils.map_onnx_to_numpy_type(dtype)))
            ctx.replace_inputs(node, [one.output[0], erf.output[0]])
            node.type = "Sub"

    _registered = True


def require(module: str, what: str):
    """``module`` imported, or one message naming the install line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SegtrainError(f"{what} needs {module}, which is not installed: {INSTALL}") from None


@contextlib.contextmanager
def _tf2onnx_log():
    """tf2onnx's log records (its INFO lines kept off the terminal), as a list of messages."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("tf2onnx")
    handler, level, propagate = Keep(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
