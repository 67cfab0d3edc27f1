"""The step-by-step transforms that training's one-window path replaced (segtrain.data.transforms):
the reference the tests hold it to. The same draws from the same seeds: scale, then crop, then
flip, then colour jitter, each on the whole image."""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from segtrain.data.transforms import Size, pad_to_size, resize


def random_scale(
    image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, min_scale: float, max_scale: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """Rescales both by one factor drawn uniformly from [min_scale, max_scale]."""
    scale = tf.random.stateless_uniform([], seed, min_scale, max_scale)
    hw = tf.cast(tf.shape(image)[:2], tf.float32) * scale
    size = tf.maximum(tf.cast(tf.round(hw), tf.int32), 1)
    return resize(image, label, size)


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
