"""The serving computation every export format shares: uint8 images (or encoded bytes) in,
named outputs out, with the training normalisation and the model's inference inside."""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from segtrain.images import is_rgb
from segtrain.task import Task

METADATA_FILE = "segtrain_export.json"
IMAGES_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serving_bytes"


def images_input(channels: int = 3, dtype: str = "uint8") -> tf.TensorSpec:
    """The ``images`` input of a model of ``channels`` bands of ``dtype`` (IMAGES_INPUT for RGB)."""
    return tf.TensorSpec([None, None, None, channels], tf.dtypes.as_dtype(dtype), name="images")


IMAGES_INPUT = images_input()
BYTES_INPUT = tf.TensorSpec([None], tf.string, name="image_bytes")


def output_names(probabilities: bool = False) -> list[str]:
    """The names of the signatures' outputs, in a stable order."""
    return ["logits", "labels"] + (["probabilities"] if probabilities else [])


def serving_functions(
    logits_fn: Callable[[tf.Tensor], tf.Tensor],
    normalization: Callable[[tf.Tensor], tf.Tensor],
    probabilities: bool = False,
    encoded: bool = True,
    task: Task | None = None,
    channels: int = 3,
    dtype: str = "uint8",
) -> dict[str, tf.types.experimental.GenericFunction]:
    """The serving signatures' functions, traced, by signature name.

    Args:
      logits_fn: normalised float32 images [B,H,W,3] -> logits [B,H,W,C] at the input size, in TF
        ops (``Inference.logits``: padding to the size divisor and cropping back happen there).
      normalization: uint8 RGB [B,H,W,3] -> the model's input (the run's training normalisation).
      probabilities: also return the softmax of the logits as ``probabilities``.
      encoded: also the ``serving_bytes`` function (encoded images in; the SavedModel's only).
      task: what the logits mean (default: classes): a multi-label task's ``labels`` are the
        labels over its threshold packed as bits, its ``probabilities`` their sigmoids.
      channels, dtype: the images' bands and sample type (a model of other bands than 8-bit
        RGB takes them as stored, and has no ``serving_bytes``: encoded files are RGB).
    """
    rgb = is_rgb(channels, dtype)
    task = task or Task(1)

    def outputs(images: tf.Tensor) -> dict[str, tf.Tensor]:
        # A mixed-precision model may compute in float16; servers always get float32.
        logits = tf.cast(logits_fn(normalization(tf.cast(images, tf.float32))), tf.float32)
        out = {"logits": logits, "labels": task.predict(logits)}
        if probabilities:
            # With test-time augmentation the logits are those of the mean probabilities.
            out["probabilities"] = task.probabilities(logits)
        return out

    # Inference and the decoder use explicit TF control flow, so autograph (slow to convert)
    # is off, as in Keras's own export.
    @tf.function(input_signature=[images_input(channels, dtype)], autograph=False)
    def serve_images(images):
        return outputs(images)

    @tf.function(input_signature=[BYTES_INPUT], autograph=False)
    def serve_bytes(image_bytes):
        # The images function does the rest, so both signatures run the very same computation.
        return serve_images(decode_batch(image_bytes))

    functions = {IMAGES_SIGNATURE: serve_images, **({BYTES_SIGNATURE: serve_bytes} if encoded and rgb else {})}
    for fn in functions.values():
        fn.get_concrete_function()  # trace now: errors surface here, before anything is written
    return functions


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
