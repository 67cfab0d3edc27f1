"""A trained model as a TF SavedModel for serving: uint8 images or encoded image bytes in.

The SavedModel has two signatures; both normalise the images the way the model was trained,
pad them to the model's size divisor and crop the result back (segtrain.inference), so a server
sends plain RGB pixels or files and reads class scores at the input size:

    serving_default  images: uint8 [B, H, W, 3], any H and W
    serving_bytes    image_bytes: string [B], encoded JPEG, PNG, GIF (first frame) or BMP;
                     every image of one batch must have the same size (send others apart)

Each returns ``logits`` float32 [B, H, W, C], ``labels`` int32 [B, H, W] (their argmax) and,
when asked for, ``probabilities`` float32 [B, H, W, C] (their softmax). Outputs are float32 at
every training precision.

The archive is written with Keras 3's ``keras.export.ExportArchive`` into a temporary sibling
directory and renamed into place when complete, next to ``segtrain_export.json``: what the
labels mean (class names, palette) and how the model was exported.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Callable

import keras
import tensorflow as tf

from segtrain.errors import SegtrainError
from segtrain.io import WriteError, os_reason, write_json

METADATA_FILE = "segtrain_export.json"
IMAGES_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serving_bytes"
IMAGES_INPUT = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
BYTES_INPUT = tf.TensorSpec([None], tf.string, name="image_bytes")


def output_names(probabilities: bool = False) -> list[str]:
    """The names of the signatures' outputs, in a stable order."""
    return ["logits", "labels"] + (["probabilities"] if probabilities else [])


def check_output(output: str | None, overwrite: bool = False) -> str:
    """``output`` as an absolute path, once it is known that writing there is allowed.

    Raises:
      SegtrainError: no --output, or one that exists without ``overwrite``.
    """
    if not output:
        raise SegtrainError("--output is required: the SavedModel directory to write, e.g. "
                            "--output=runs/quickstart/segtrain_model/1 (TF Serving wants a numbered version "
                            "directory).")
    path = os.path.abspath(os.path.expanduser(output))
    if os.path.lexists(path) and not overwrite:
        raise SegtrainError(f"--output={output} already exists: pass --overwrite to replace it, or choose "
                            f"another directory (e.g. the next version number).")
    return path


def serving_functions(
    logits_fn: Callable[[tf.Tensor], tf.Tensor],
    normalization: Callable[[tf.Tensor], tf.Tensor],
    probabilities: bool = False,
) -> dict[str, tf.types.experimental.GenericFunction]:
    """The serving signatures' functions, traced, by signature name.

    Args:
      logits_fn: normalised float32 images [B,H,W,3] -> logits [B,H,W,C] at the input size, in TF
        ops (``Inference.logits``: padding to the size divisor and cropping back happen there).
      normalization: uint8 RGB [B,H,W,3] -> the model's input (the run's training normalisation).
      probabilities: also return the softmax of the logits as ``probabilities``.
    """

    def outputs(images: tf.Tensor) -> dict[str, tf.Tensor]:
        # A mixed-precision model may compute in float16; servers always get float32.
        logits = tf.cast(logits_fn(normalization(tf.cast(images, tf.float32))), tf.float32)
        out = {"logits": logits, "labels": tf.argmax(logits, axis=-1, output_type=tf.int32)}
        if probabilities:
            # With test-time augmentation the logits are log-probabilities, so this is their mean.
            out["probabilities"] = tf.nn.softmax(logits, axis=-1)
        return out

    # Inference and the decoder use explicit TF control flow, so autograph (slow to convert)
    # is off, as in Keras's own export.
    @tf.function(input_signature=[IMAGES_INPUT], autograph=False)
    def serve_images(images):
        return outputs(images)

    @tf.function(input_signature=[BYTES_INPUT], autograph=False)
    def serve_bytes(image_bytes):
        # The images function does the rest, so both signatures run the very same computation.
        return serve_images(decode_batch(image_bytes))

    for fn in (serve_images, serve_bytes):
        fn.get_concrete_function()  # trace now: errors surface here, before anything is written
    return {IMAGES_SIGNATURE: serve_images, BYTES_SIGNATURE: serve_bytes}


def decode_batch(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded images (string [B], B >= 1, all of one size) -> uint8 RGB [B, H, W, 3].

    Grey images are expanded to RGB, an alpha channel is dropped, an animation gives its first
    frame. Images of different sizes fail with a message that says to send them apart.
    """

    def decode(data):
        return tf.io.decode_image(data, channels=3, expand_animations=False)

    first = tf.shape(decode(image_bytes[0]))

    def decode_checked(data):
        image = decode(data)
        check = tf.debugging.assert_equal(
            tf.shape(image), first,
            message="serving_bytes: every image of one request must have the same size; send images of "
                    "other sizes in separate requests")
        with tf.control_dependencies([check]):
            return tf.identity(image)

    return tf.map_fn(decode_checked, image_bytes, fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


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
) -> str:
    """Writes ``model`` as a SavedModel with both serving signatures, atomically.

    Args:
      output: the SavedModel directory; it appears only once complete.
      model: the model ``logits_fn`` calls (its variables are saved).
      logits_fn: normalised images -> logits at the input size (see ``serving_functions``).
      normalization: the training normalisation, applied inside the signatures.
      num_classes: C, the logits' last dimension.
      size_divisor: what the model's input size must be a multiple of (recorded; ``logits_fn``
        pads to it).
      probabilities: also return ``probabilities``.
      metadata: more entries for segtrain_export.json (class names, palette, checkpoint, step...).
      overwrite: replace an existing ``output``; the old one is removed only after the new one
        is complete.

    Returns:
      The absolute path of the SavedModel directory.

    Raises:
      SegtrainError: ``output`` exists without ``overwrite``.
    """
    path = check_output(output, overwrite)
    functions = serving_functions(logits_fn, normalization, probabilities)
    archive = keras.export.ExportArchive()
    archive.track(model)  # before the endpoints: their functions read its variables
    for name, fn in functions.items():
        archive.add_endpoint(name, fn)
    names = output_names(probabilities)
    info = {
        "format": "TF SavedModel",
        "signatures": {
            IMAGES_SIGNATURE: {"inputs": {"images": {"dtype": "uint8", "shape": [None, None, None, 3]}}},
            BYTES_SIGNATURE: {"inputs": {"image_bytes": {"dtype": "string", "shape": [None],
                                                         "note": "JPEG/PNG/GIF/BMP; one size per request"}}},
        },
        "outputs": {
            "logits": {"dtype": "float32", "shape": [None, None, None, num_classes]},
            "labels": {"dtype": "int32", "shape": [None, None, None]},
            **({"probabilities": {"dtype": "float32", "shape": [None, None, None, num_classes]}}
               if probabilities else {}),
        },
        "output_names": names,
        "num_classes": int(num_classes),
        "size_divisor": int(size_divisor),
        "normalization": describe_normalization(normalization),
        **(metadata or {}),
    }
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
        archive.write_out(staging, verbose=False)
        write_json(os.path.join(staging, METADATA_FILE), info)
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
