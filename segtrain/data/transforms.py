"""Per-example transforms of the shared input pipeline, in pure TF ops.

Images are [H,W,3] on the [0, 255] scale, uint8 until a resize makes them float32 (geometric
transforms work on either); labels are uint8 [H,W] class ids. Every geometric transform moves
image and label together, and labels only ever use nearest-neighbour sampling. Random transforms are stateless: they take a seed [2], so the
pipeline gives the same augmentations for the same seed however many threads run it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

from segtrain.errors import DATA_ERROR_MARKER, SegtrainError

Size = Sequence[int]

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, on the [0, 255] scale
IMAGENET_STD = (58.395, 57.12, 57.375)


def check_labels(label: tf.Tensor, num_classes: int, ignore_label: int, where: str) -> tf.Tensor:
    """Fails with a clear message if a label is neither a class nor the ignore label."""
    bad = tf.logical_and(label >= num_classes, label != ignore_label)
    first_bad = tf.reduce_max(tf.where(bad, label, tf.zeros_like(label)))
    message = tf.strings.format(
        DATA_ERROR_MARKER + "label value {} in " + where + " is neither a class id in "
        f"[0, {num_classes - 1}] nor the ignore label {ignore_label}. Fix the labels, or map "
        "that value to a class or to the ignore label in the dataset plugin.",
        first_bad,
    )
    with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [message])]):
        return tf.identity(label)


def resize(image: tf.Tensor, label: tf.Tensor, size: Size) -> tuple[tf.Tensor, tf.Tensor]:
    """Resizes to ``size`` (height, width): bilinear for the image (float32 out), nearest for the label."""
    image = tf.image.resize(image, size, method="bilinear")
    return image, resize_nearest(label, size)


def resize_nearest(label: tf.Tensor, size: Size) -> tf.Tensor:
    """Nearest-neighbour resize of a [H,W] label, in its own dtype.

    The same pixels as ``tf.image.resize(..., method='nearest')`` (half-pixel centres), taken with
    two gathers instead of a float resize of the whole label.
    """

    def indices(n_in, n_out):
        scale = tf.cast(n_in, tf.float32) / tf.cast(n_out, tf.float32)
        i = tf.floor((tf.range(n_out, dtype=tf.float32) + 0.5) * scale)
        return tf.minimum(tf.cast(i, tf.int32), n_in - 1)

    shape = tf.shape(label)
    rows = tf.gather(label, indices(shape[0], size[0]), axis=0)
    return tf.gather(rows, indices(shape[1], size[1]), axis=1)


def random_scale(
    image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, min_scale: float, max_scale: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """Rescales both by one factor drawn uniformly from [min_scale, max_scale]."""
    scale = tf.random.stateless_uniform([], seed, min_scale, max_scale)
    hw = tf.cast(tf.shape(image)[:2], tf.float32) * scale
    size = tf.maximum(tf.cast(tf.round(hw), tf.int32), 1)
    return resize(image, label, size)


def pad_to_size(
    image: tf.Tensor,
    label: tf.Tensor,
    size: tf.Tensor | Size,
    ignore_label: int,
    image_fill: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Pads bottom and right up to at least ``size``; labels are padded with the ignore label."""
    shape = tf.shape(image)
    pad_h = tf.maximum(size[0] - shape[0], 0)
    pad_w = tf.maximum(size[1] - shape[1], 0)
    paddings = [[0, pad_h], [0, pad_w]]
    fill = round(image_fill) if image.dtype.is_integer else image_fill
    image = tf.pad(image, paddings + [[0, 0]], constant_values=tf.cast(fill, image.dtype))
    label = tf.pad(label, paddings, constant_values=tf.cast(ignore_label, label.dtype))
    return image, label


def pad_to_multiple(
    image: tf.Tensor, label: tf.Tensor, multiple: int, ignore_label: int, image_fill: float = 0.0
) -> tuple[tf.Tensor, tf.Tensor]:
    """Pads bottom and right so height and width are multiples of ``multiple``."""
    hw = tf.shape(image)[:2]
    target = (hw + multiple - 1) // multiple * multiple
    return pad_to_size(image, label, target, ignore_label, image_fill)


def random_crop(
    image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, size: Size, ignore_label: int,
    image_fill: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """A random ``size`` crop of both; smaller inputs are padded first (labels with ignore)."""
    image, label = pad_to_size(image, label, size, ignore_label, image_fill)
    room = tf.shape(label) - tf.constant(size[:2], tf.int32) + 1  # possible offsets per axis
    u = tf.random.stateless_uniform([2], seed)
    top, left = tf.unstack(tf.minimum(tf.cast(u * tf.cast(room, tf.float32), tf.int32), room - 1))
    image = tf.slice(image, [top, left, 0], [size[0], size[1], -1])
    label = tf.slice(label, [top, left], [size[0], size[1]])
    return tf.ensure_shape(image, [size[0], size[1], None]), tf.ensure_shape(label, [size[0], size[1]])


def random_flip(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mirrors both left-right with probability 1/2."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
    return image, label


def colour_jitter(
    image: tf.Tensor,
    seed: tf.Tensor,
    brightness: float = 0.0,
    contrast: Sequence[float] | None = None,
    hue: float = 0.0,
    saturation: Sequence[float] | None = None,
) -> tf.Tensor:
    """Random brightness (additive, on [0,1]), contrast and saturation (factor ranges) and hue."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    x = tf.cast(image, tf.float32) / 255.0
    if brightness:
        x = tf.image.stateless_random_brightness(x, brightness, seeds[0])
    if contrast:
        x = tf.image.stateless_random_contrast(x, contrast[0], contrast[1], seeds[1])
    if saturation:
        x = tf.image.stateless_random_saturation(x, saturation[0], saturation[1], seeds[2])
    if hue:
        x = tf.image.stateless_random_hue(tf.clip_by_value(x, 0.0, 1.0), hue, seeds[3])
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(image - mean) / std per channel, with mean and std on the [0, 255] scale."""
    return (tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


@dataclasses.dataclass(frozen=True)
class Normalization:
    """What turns an RGB image on the [0, 255] scale into a model's input.

    Attributes:
      mean, std: per channel, on the [0, 255] scale, in the channel order the model sees.
      bgr: reverse the channels (RGB -> BGR) first, as Caffe-trained weights expect.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    bgr: bool = False

    def __call__(self, image: tf.Tensor) -> tf.Tensor:
        if self.bgr:
            image = tf.reverse(image, axis=[-1])
        return normalize(image, self.mean, self.std)

    def invert(self, image) -> np.ndarray:
        """A normalised image back to uint8 RGB NumPy, for display."""
        pixels = np.asarray(image, np.float32) * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
        return pixels[..., ::-1] if self.bgr else pixels

    @property
    def fill(self) -> float:
        """A padding value that normalises to about 0."""
        return float(sum(self.mean) / len(self.mean))


# keras.applications' preprocessing modes: the input each family of pretrained weights expects.
PREPROCESSING = {
    "caffe": Normalization((103.939, 116.779, 123.68), (1.0, 1.0, 1.0), bgr=True),  # ResNet, VGG
    "tf": Normalization((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),  # [-1, 1]: Xception, MobileNet
    "torch": Normalization(IMAGENET_MEAN, IMAGENET_STD),  # DenseNet; also segtrain's default
}


def preprocessing(name: str | None) -> Normalization:
    """The Normalization of a preprocessing mode ('caffe', 'tf', 'torch'); None: the default.

    Raises:
      SegtrainError: an unknown mode.
    """
    if name is None:
        return Normalization()
    if name not in PREPROCESSING:
        raise SegtrainError(f"Unknown input preprocessing {name!r}: use one of {', '.join(PREPROCESSING)}.")
    return PREPROCESSING[name]
