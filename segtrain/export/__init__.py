"""A trained model for serving: a TF SavedModel (uint8 images or encoded image bytes in), a TFLite
flat buffer or an ONNX model (uint8 images in; segtrain.export.tflite, segtrain.export.onnx).

The SavedModel has two signatures; both normalise the images the way the model was trained,
pad them to the model's size divisor and crop the result back (segtrain.inference), so a server
sends plain RGB pixels or files and reads class scores at the input size:

    serving_default  images: uint8 [B, H, W, 3], any H and W
    serving_bytes    image_bytes: string [B], encoded JPEG, PNG, GIF (first frame) or BMP;
                     every image of one batch must have the same size (send others apart)

A model of other bands than 8-bit RGB (multispectral, 16-bit) takes ``images`` of its bands and
sample type, [B, H, W, C] uint8 or uint16, and has no ``serving_bytes``; segtrain_export.json
then names its ``channels`` and ``image_dtype``.

Each returns ``logits`` float32 [B, H, W, C], ``labels`` int32 [B, H, W] (their argmax) and,
when asked for, ``probabilities`` float32 [B, H, W, C] (their softmax). Outputs are float32 at
every training precision. A multi-label (or binary) model's ``probabilities`` are each label's
sigmoid and its ``labels`` the labels whose probability exceeds the threshold, packed as bits
(label i: ``(labels >> i) & 1``); segtrain_export.json then has ``"multilabel": true`` and the
``threshold``.

The SavedModel is written with Keras 3's ``keras.export.ExportArchive``; a TFLite or ONNX
export is a directory holding ``model.tflite`` or ``model.onnx``. Every export is written into a
temporary sibling directory and renamed into place when complete, next to
``segtrain_export.json``: what the labels mean (class names, palette), the input it takes and
how it was exported. segtrain.export.runtime loads any of them back.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Callable, Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from segtrain.errors import SegtrainError

# The serving computation lives in segtrain.export.serving (the converters import it); its names
# are the package's too.
from segtrain.export.serving import (  # noqa: F401
    BYTES_INPUT,
    BYTES_SIGNATURE,
    IMAGES_INPUT,
    IMAGES_SIGNATURE,
    METADATA_FILE,
    decode_batch,
    output_names,
    serving_functions,
)
from segtrain.images import is_rgb
from segtrain.io import WriteError, os_reason, write_json
from segtrain.task import Task


def check_output(output: str | None, overwrite: bool = False) -> str:
    """``output`` as an absolute path, once it is known that writing there is allowed.

    Raises:
      SegtrainError: no --output, or one that exists without ``overwrite``.
    """
    if not output:
        raise SegtrainError("--output is required: the export directory to write, e.g. "
                            "--output=runs/quickstart/segtrain_model/1 (TF Serving wants a numbered version "
                            "directory).")
    path = os.path.abspath(os.path.expanduser(output))
    if os.path.lexists(path) and not overwrite:
        raise SegtrainError(f"--output={output} already exists: pass --overwrite to replace it, or choose "
                            f"another directory (e.g. the next version number).")
    return path


def describe_normalization(normalization) -> dict:
    """The normalisation as JSON-ready data (mean, std on the [0, 255] scale, bgr)."""
    if dataclasses.is_dataclass(normalization):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(normalization).items()}
    return {"description": repr(normalization)}


def export_model(
    output: str,
    model: keras.Model,
    logits_fn: Callable[[tf.Tensor], tf.Tensor],
    normalization: Callable[[tf.Tensor], tf.Tensor],
    num_classes: int,
    size_divisor: int = 1,
    probabilities: bool = False,
    metadata: dict | None = None,
    overwrite: bool = False,
    format: str = "saved_model",
    quantize: str | None = None,
    image_size: Sequence[int] | None = None,
    calibration: Callable[[], Iterable[np.ndarray]] | None = None,
    opset: int | None = None,
    finish: Callable[[str, Callable], None] | None = None,
    task: Task | None = None,
    channels: int = 3,
    image_dtype: str = "uint8",
) -> str:
    """Writes ``model`` as an export of ``format`` into the directory ``output``, atomically.

    Args:
      output: the export directory; it appears only once complete.
      model: the model ``logits_fn`` calls (its layers name an op a format cannot take).
      logits_fn: normalised images -> logits at the input size (see ``serving_functions``).
      normalization: the training normalisation, applied inside the signatures.
      num_classes: C, the logits' last dimension.
      size_divisor: what the model's input size must be a multiple of (recorded; ``logits_fn``
        pads to it).
      probabilities: also return ``probabilities``.
      metadata: more entries for segtrain_export.json (class names, palette, checkpoint, step...).
      overwrite: replace an existing ``output``; the old one is removed only after the new one
        is complete.
      format: 'saved_model' (the directory is the SavedModel), 'tflite' (model.tflite) or
        'onnx' (model.onnx).
      quantize: TFLite only: None (float32), 'float16', 'dynamic' or 'int8'.
      image_size: TFLite only: the (height, width) the flat buffer takes.
      calibration: TFLite int8: a function returning uint8 images [H, W, 3] of ``image_size``.
      opset: ONNX only: the opset (default segtrain.export.onnx.DEFAULT_OPSET).
      finish: called with the staging directory and the traced ``serving_default`` function
        once the model and metadata are in the directory, before it is moved into place (what it
        writes lands with the export, or nothing does).
      task: what the logits mean (default: C classes): a multi-label task's labels and
        probabilities (segtrain.task).
      channels, image_dtype: the images the model takes: 8-bit RGB, or bands as stored (no
        ``serving_bytes`` signature then).

    Returns:
      The absolute path of the export directory.

    Raises:
      SegtrainError: ``output`` exists without ``overwrite``; the format cannot take the model.
    """
    path = check_output(output, overwrite)
    functions = serving_functions(logits_fn, normalization, probabilities, encoded=format == "saved_model",
                                  task=task, channels=channels, dtype=image_dtype)
    rgb = is_rgb(channels, image_dtype)
    multilabel = bool(task and task.multilabel)
    names = output_names(probabilities)
    fixed = format == "tflite"
    spatial = [None, int(image_size[0]), int(image_size[1])] if fixed else [None, None, None]
    info = {
        "format": format,
        "signatures": {
            IMAGES_SIGNATURE: {"inputs": {"images": {"dtype": image_dtype, "shape": [*spatial, channels]}}},
        },
        "outputs": {
            "logits": {"dtype": "float32", "shape": [*spatial, num_classes]},
            "labels": {"dtype": "int32", "shape": spatial},
            **({"probabilities": {"dtype": "float32", "shape": [*spatial, num_classes]}}
               if probabilities else {}),
        },
        "output_names": names,
        "num_classes": int(num_classes),
        **({"multilabel": True, "threshold": float(task.threshold)} if multilabel else {}),
        **({"temperature": float(task.temperature)} if task is not None and task.temperature != 1.0 else {}),
        **({} if rgb else {"channels": int(channels), "image_dtype": image_dtype}),
        "size_divisor": int(size_divisor),
        "normalization": describe_normalization(normalization),
        **(metadata or {}),
    }
    if format == "saved_model":
        if rgb:
            info["signatures"][BYTES_SIGNATURE] = {"inputs": {"image_bytes": {
                "dtype": "string", "shape": [None], "note": "JPEG/PNG/GIF/BMP; one size per request"}}}
    elif format == "tflite":
        from segtrain.export import frozen, tflite

        blob = tflite.convert(functions[IMAGES_SIGNATURE], image_size, quantize, calibration, frozen.layer_names(model))
        info.update(model_file=tflite.MODEL_FILE, quantize=quantize, image_size=[int(v) for v in image_size],
                    runtime="LiteRT (ai-edge-litert) or tf.lite.Interpreter")
    elif format == "onnx":
        from segtrain.export import frozen, onnx

        opset = opset or onnx.DEFAULT_OPSET
        blob = onnx.convert(functions[IMAGES_SIGNATURE], opset, frozen.layer_names(model))
        info.update(model_file=onnx.MODEL_FILE, opset=opset, runtime="ONNX Runtime (onnxruntime)")
    else:
        raise SegtrainError(f"--format={format}: choose one of saved_model, tflite, onnx.")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise WriteError(path, os_reason(e), "the export") from None
    # mkdtemp makes the directory private; give it the permissions a plain mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        if format == "saved_model":
            archive = keras.export.ExportArchive()
            # The endpoints' own variables are all a server needs, and the archive finds them in the
            # functions. Tracking the model as well would save every weight a second time (its
            # Keras variables beside their tf.Variables): twice the size on disk, nothing gained.
            for name, fn in functions.items():
                archive.add_endpoint(name, fn)
            archive.write_out(staging, verbose=False)
        else:
            with open(os.path.join(staging, info["model_file"]), "wb") as f:
                f.write(blob)
        write_json(os.path.join(staging, METADATA_FILE), info)
        if finish is not None:
            finish(staging, functions[IMAGES_SIGNATURE])
        _move_into_place(staging, path, overwrite)
    except (tf.errors.OpError, OSError, WriteError) as e:  # a full or read-only disk
        raise WriteError(path, os_reason(e), "the export") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _move_into_place(staging: str, path: str, overwrite: bool) -> None:
    """Renames the complete ``staging`` directory to ``path``, replacing what is there if allowed."""
    if not os.path.lexists(path):
        os.rename(staging, path)
        return
    check_output(path, overwrite)
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=os.path.dirname(path))
    os.rmdir(old)  # only the unique name is wanted
    os.rename(path, old)
    try:
        os.rename(staging, path)
    except OSError:
        os.rename(old, path)  # put the old export back
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)
