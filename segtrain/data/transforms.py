"""Per-example transforms of the shared input pipeline, in pure TF ops.

Images are [H,W,3] on the [0, 255] scale, uint8 until a resize makes them float32 (geometric
transforms work on either); labels are uint8 [H,W] class ids. Every geometric transform moves
image and label together, and labels only ever use nearest-neighbour sampling. Random transforms are stateless: they take a seed [2], so the
pipeline gives the same augmentations for the same seed however many threads run it.

Training draws its geometry once, as a region of the source image (``random_region``): the
pixels that a resize, a random scale and a random crop would keep, so only they are decoded and
resized (``resize_region``); ``jitter_and_normalize`` then works on the crop alone, or
``finish_batch`` on a whole batch inside the training step (``pipeline.colour_on_device``). The
step-by-step transforms they replace live on in tests/data/stepwise.py, as the reference the
tests hold them to (the same draws from the same seeds).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from segtrain.errors import DATA_ERROR_MARKER, SegtrainError
from segtrain.images import display

Size = Sequence[int]

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, on the [0, 255] scale
IMAGENET_STD = (58.395, 57.12, 57.375)


def check_labels(label: tf.Tensor, num_classes: int, ignore_label: int, where: str, multilabel: bool = False) -> tf.Tensor:
    """Fails with a clear message if a label is neither a class (multi-label: a combination of
    the labels' bits) nor the ignore label."""
    limit = 2 ** num_classes if multilabel else num_classes
    bad = tf.logical_and(label >= limit, label != ignore_label)
    first_bad = tf.reduce_max(tf.where(bad, label, tf.zeros_like(label)))
    what = (f"a combination of the {num_classes} labels' bits [0, {limit - 1}]" if multilabel
            else f"a class id in [0, {num_classes - 1}]")
    message = tf.strings.format(
        DATA_ERROR_MARKER + "label value {} in " + where + f" is neither {what} nor the ignore label "
        f"{ignore_label}. Fix the labels, or map that value to a class or to the ignore label in the dataset plugin.",
        first_bad,
    )
    with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [message])]):
        return tf.identity(label)


def resize(image: tf.Tensor, label: tf.Tensor, size: Size) -> tuple[tf.Tensor, tf.Tensor]:
    """Resizes to ``size`` (height, width): bilinear for the image (float32 out), nearest for the label."""
    image = tf.image.resize(image, size, method="bilinear")
    return image, resize_nearest(label, size)


def resize_nearest(label: tf.Tensor, size: Size, mirror: tf.Tensor | None = None) -> tf.Tensor:
    """Nearest-neighbour resize of a [H,W] label, in its own dtype, mirrored left-right if ``mirror``.

    The same pixels as ``tf.image.resize(..., method='nearest')`` (half-pixel centres), taken with
    two gathers instead of a float resize of the whole label.
    """

    def indices(n_in, n_out):
        scale = tf.cast(n_in, tf.float32) / tf.cast(n_out, tf.float32)
        i = tf.floor((tf.range(n_out, dtype=tf.float32) + 0.5) * scale)
        return tf.minimum(tf.cast(i, tf.int32), n_in - 1)

    shape = tf.shape(label)
    rows = tf.gather(label, indices(shape[0], size[0]), axis=0)
    cols = indices(shape[1], size[1])
    if mirror is not None:
        cols = tf.cond(mirror, lambda: tf.reverse(cols, [0]), lambda: cols)
    # A gather along the last axis copies byte by byte, one along the first copies whole rows:
    # with the two transposes it costs a fifth.
    return tf.transpose(tf.gather(tf.transpose(rows), cols, axis=0))


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


class Region(NamedTuple):
    """Where a training crop comes from in its source image, and what it becomes.

    Attributes:
      offset: [2] int32, top and left of the region in source pixels.
      extent: [2] int32, its height and width in source pixels.
      size: [2] int32, the height and width it is resized to: the crop's, less the padding
        where the scaled image is smaller than the crop.
    """

    offset: tf.Tensor
    extent: tf.Tensor
    size: tf.Tensor


def random_region(
    image_size: tf.Tensor,
    scale_seed: tf.Tensor,
    crop_seed: tf.Tensor,
    resize: Size | None = None,
    min_scale: float = 1.0,
    max_scale: float = 1.0,
    crop_size: Size | None = None,
) -> Region:
    """The source region of a resize, a random scale and a random crop, from the sizes alone.

    The draws are those of the step-by-step transforms (same seeds, same formulas), so the
    scale and the crop offsets have the same distribution; the region is rounded to whole
    source pixels, which moves the crop by at most half a source pixel.

    Args:
      image_size: [2] (height, width) of the source image.
      scale_seed, crop_seed: seeds [2] of the scale factor and of the crop offset.
      resize: (height, width) the image is first resized to, or None.
      min_scale, max_scale: range of the random scale factor.
      crop_size: (height, width) of the crop, or None (the whole scaled image).
    """
    source = tf.cast(image_size, tf.int32)[:2]
    scaled = tf.constant(resize[:2], tf.int32) if resize else source
    if (min_scale, max_scale) != (1.0, 1.0):
        scale = tf.random.stateless_uniform([], scale_seed, min_scale, max_scale)
        scaled = tf.maximum(tf.cast(tf.round(tf.cast(scaled, tf.float32) * scale), tf.int32), 1)
    if crop_size:
        crop = tf.constant(crop_size[:2], tf.int32)
        room = tf.maximum(scaled - crop, 0) + 1  # possible offsets per axis (one where padded)
        u = tf.random.stateless_uniform([2], crop_seed)
        start = tf.minimum(tf.cast(u * tf.cast(room, tf.float32), tf.int32), room - 1)
        size = tf.minimum(scaled, crop)
    else:
        start, size = tf.zeros([2], tf.int32), scaled
    ratio = tf.cast(source, tf.float32) / tf.cast(scaled, tf.float32)  # source pixels per scaled pixel
    begin = tf.minimum(tf.cast(tf.round(tf.cast(start, tf.float32) * ratio), tf.int32), source - 1)
    end = tf.cast(tf.round(tf.cast(start + size, tf.float32) * ratio), tf.int32)
    end = tf.clip_by_value(end, begin + 1, source)
    return Region(begin, end - begin, size)


def take_region(image: tf.Tensor, label: tf.Tensor, region: Region) -> tuple[tf.Tensor, tf.Tensor]:
    """The region's pixels of a decoded image and label."""
    image = tf.slice(image, tf.concat([region.offset, [0]], 0), tf.concat([region.extent, [-1]], 0))
    return image, tf.slice(label, region.offset, region.extent)


def resize_region(
    image: tf.Tensor,
    label: tf.Tensor,
    size: tf.Tensor,
    flip: tf.Tensor | None,
    crop_size: Size | None,
    ignore_label: int,
    image_fill: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """A region (``take_region``, or decoded as one) to its training crop.

    Resizes to ``size`` (bilinear, float32 out; nearest for the label), mirrors both when
    ``flip``, and pads up to ``crop_size`` (labels with the ignore label) on the side the
    step-by-step transforms pad: bottom, and right, or left when mirrored.
    """
    if flip is not None:
        # Mirroring commutes with a half-pixel-centre bilinear resize, and costs a quarter as much
        # on the uint8 region as on the float32 crop.
        image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    image = tf.cast(image, tf.float32)  # float in: the resize runs faster than on uint8
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
    image = tf.cond(same, lambda: image, lambda: tf.image.resize(image, size, method="bilinear"))
    label = resize_nearest(label, size, flip)
    if not crop_size:
        return image, label
    pad = tf.constant(crop_size[:2], tf.int32) - size
    left = tf.where(flip, pad[1], 0) if flip is not None else 0
    paddings = [[0, pad[0]], [left, pad[1] - left]]

    def padded():
        return (tf.pad(image, paddings + [[0, 0]], constant_values=image_fill),
                tf.pad(label, paddings, constant_values=tf.cast(ignore_label, label.dtype)))

    # Most crops need no padding, and a pad by nothing still copies the image.
    image, label = tf.cond(tf.reduce_any(pad > 0), padded, lambda: (image, label))
    return tf.ensure_shape(image, [crop_size[0], crop_size[1], None]), tf.ensure_shape(label, crop_size[:2])


COLOUR_DRAWS = ("brightness", "contrast", "saturation", "hue")  # in the order they are applied


def colour_draws(
    seed: tf.Tensor,
    brightness: float = 0.0,
    contrast: Sequence[float] | None = None,
    hue: float = 0.0,
    saturation: Sequence[float] | None = None,
) -> dict[str, tf.Tensor]:
    """The random colour changes of one image, by name, for the jitter steps that are on.

    'brightness' is the delta on the [0, 255] scale, 'contrast' and 'saturation' the factors,
    'hue' the shift: what ``colour_jitter`` draws from the same seed (its brightness delta is on
    the [0, 1] scale).
    """
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    draws = {}
    if brightness:
        draws["brightness"] = 255.0 * tf.random.stateless_uniform([], seeds[0], -brightness, brightness)
    if contrast:
        draws["contrast"] = tf.random.stateless_uniform([], seeds[1], contrast[0], contrast[1])
    if saturation:
        draws["saturation"] = tf.random.stateless_uniform([], seeds[2], saturation[0], saturation[1])
    if hue:
        draws["hue"] = tf.random.stateless_uniform([], seeds[3], -hue, hue)
    return draws


def jitter_and_normalize(
    image: tf.Tensor,
    seed: tf.Tensor,
    normalization: "Normalization",
    brightness: float = 0.0,
    contrast: Sequence[float] | None = None,
    hue: float = 0.0,
    saturation: Sequence[float] | None = None,
) -> tf.Tensor:
    """``normalization(colour_jitter(image, seed, ...))`` in fewer float passes.

    The same draws and the same colours: it stays on the [0, 255] scale (contrast, saturation
    and hue do not depend on the scale; the brightness delta is scaled), and drops the final
    clip after a hue shift, whose output is within range already.
    """
    x = tf.cast(image, tf.float32)
    draws = colour_draws(seed, brightness, contrast, hue, saturation)
    if draws:
        x = _apply_colour(x, draws)
    return normalization(x)


def _apply_colour(x: tf.Tensor, draws: dict) -> tf.Tensor:
    """The colour draws applied to float RGB [H,W,3] on the [0, 255] scale."""
    if "brightness" in draws:
        x = x + draws["brightness"]
    if "contrast" in draws:
        x = tf.image.adjust_contrast(x, draws["contrast"])
    if "saturation" in draws:
        x = tf.image.adjust_saturation(x, draws["saturation"])
    x = tf.clip_by_value(x, 0.0, 255.0)
    if "hue" in draws:
        x = tf.image.adjust_hue(x, draws["hue"])
    return x


def jitter_bands_and_normalize(
    image: tf.Tensor,
    seed: tf.Tensor,
    normalization: "Normalization",
    rgb_channels: Sequence[int] | None,
    brightness: float = 0.0,
    contrast: Sequence[float] | None = None,
    hue: float = 0.0,
    saturation: Sequence[float] | None = None,
) -> tf.Tensor:
    """``jitter_and_normalize`` for images of any bands and depth: the colour changes (the same
    draws) apply to the three ``rgb_channels`` alone, scaled from [0, max_value] to [0, 255]
    and back; the other bands are only normalised."""
    x = tf.cast(image, tf.float32)
    draws = colour_draws(seed, brightness, contrast, hue, saturation)
    if draws and rgb_channels:
        scale = 255.0 / normalization.max_value
        bands = tf.unstack(x, num=len(normalization.mean), axis=-1)
        rgb = _apply_colour(tf.stack([bands[c] for c in rgb_channels], -1) * scale, draws) / scale
        for i, c in enumerate(rgb_channels):
            bands[c] = rgb[..., i]
        x = tf.stack(bands, -1)
    return normalization(x)


def finish_batch(batch: dict, normalization: "Normalization") -> tuple[tf.Tensor, tf.Tensor]:
    """A training batch's model input and int32 labels, on the device that trains.

    A batch of ``pipeline.colour_on_device`` holds uint8 crops and labels and, under 'colour',
    each image's draws (``colour_draws``, batched): its colour jitter and normalisation happen
    here, the same steps as ``jitter_and_normalize`` with one draw per image. Any other batch
    is finished already (float32 images) and only its labels are cast.
    """
    image, label = batch["image"], tf.cast(batch["label"], tf.int32)
    if image.dtype.is_floating:
        return image, label
    x = tf.cast(image, tf.float32)
    draws = batch.get("colour", {})

    def per_image(name):  # [B] -> [B, 1, 1, 1]
        return tf.reshape(tf.cast(draws[name], tf.float32), [-1, 1, 1, 1])

    if draws:
        if "brightness" in draws:
            x = x + per_image("brightness")
        if "contrast" in draws:  # adjust_contrast: each channel's mean over the image stays
            mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
            x = (x - mean) * per_image("contrast") + mean
        if "saturation" in draws:  # adjust_saturation: the HSV saturation scaled, clipped to [0, 1]
            h, s, v = tf.unstack(tf.image.rgb_to_hsv(x), axis=-1)
            s = tf.clip_by_value(s * per_image("saturation")[..., 0], 0.0, 1.0)
            x = tf.image.hsv_to_rgb(tf.stack([h, s, v], -1))
        x = tf.clip_by_value(x, 0.0, 255.0)
        if "hue" in draws:  # adjust_hue: the HSV hue shifted, modulo one turn
            h, s, v = tf.unstack(tf.image.rgb_to_hsv(x), axis=-1)
            h = tf.math.floormod(h + per_image("hue")[..., 0], 1.0)
            x = tf.image.hsv_to_rgb(tf.stack([h, s, v], -1))
    return normalization(x), label


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(image - mean) / std per channel, with mean and std on the [0, 255] scale."""
    image = tf.cast(image, tf.float32)
    scale = 1.0 / np.asarray(std, np.float32)
    offset = -np.asarray(mean, np.float32) * scale
    if image.shape.rank and image.shape[-3:].is_fully_defined():
        # On CPU an op that broadcasts a [3] vector over an image costs 5-10 times one between
        # tensors of the same shape: training crops, whose size is known, get constants of an
        # image's size (a batch of them broadcasts over its first axis alone).
        scale, offset = (np.broadcast_to(c, image.shape[-3:]).copy() for c in (scale, offset))
    return image * scale + offset


@dataclasses.dataclass(frozen=True)
class Normalization:
    """What turns an image into a model's input: an RGB image on the [0, 255] scale, or the
    bands of any image on their stored scale.

    Attributes:
      mean, std: per channel, on the images' scale, in the channel order the model sees.
      bgr: reverse the channels (RGB -> BGR) first, as Caffe-trained weights expect.
      max_value: the largest stored sample (255 for 8 bits, 65535 for 16).
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    bgr: bool = False
    max_value: float = 255.0

    def __call__(self, image: tf.Tensor) -> tf.Tensor:
        if self.bgr:
            image = tf.reverse(image, axis=[-1])
        return normalize(image, self.mean, self.std)

    def invert(self, image) -> np.ndarray:
        """A normalised image back to its stored pixels as NumPy: uint8 RGB, or the bands in
        uint8 or uint16 (``max_value``)."""
        pixels = np.asarray(image, np.float32) * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        dtype = np.uint8 if self.max_value <= 255 else np.uint16
        pixels = np.clip(np.round(pixels), 0, self.max_value).astype(dtype)
        return pixels[..., ::-1] if self.bgr else pixels

    def display(self, image, channels=None) -> np.ndarray:
        """A normalised image as uint8 RGB to look at (segtrain.images.display: bands stretched
        by their mean and std)."""
        return display(self.invert(image), self.mean, self.std, channels)

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
