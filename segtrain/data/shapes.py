"""``shapes``: a synthetic segmentation dataset drawn with TF ops (no files, no download).

Every example is a function of (seed, split, index) through stateless random ops, so the data
is identical on every machine and run, and splits never share an example.

With ``multilabel`` it is a multi-label dataset (segtrain.task): the labels are circle,
rectangle and triangle, shapes are painted half-transparent, and a pixel inside several shapes
carries each of their labels (bits 0, 1, 2 of its label value); the background is no label.
"""

from __future__ import annotations

import math

import tensorflow as tf

from registry import DATASETS
from segtrain.data.info import DatasetInfo
from segtrain.errors import SegtrainError

CLASS_NAMES = ("background", "circle", "rectangle", "triangle")
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200))
# The mean colour each shape class is painted in; colour_jitter blurs the cue so the model
# has to look at geometry too.
_CLASS_COLOURS = ((0.85, 0.25, 0.25), (0.25, 0.75, 0.35), (0.25, 0.45, 0.9))
SPLITS = ("train", "validation", "test")
IGNORE_LABEL = 255


@DATASETS.register("shapes")
def shapes(
    split: str = "train",
    num_train: int = 4000,
    num_validation: int = 200,
    num_test: int = 200,
    min_size: int = 64,
    max_size: int = 96,
    max_shapes: int = 4,
    colour_jitter: float = 0.3,
    noise: float = 0.05,
    outline_width: int = 0,
    random_colours: bool = False,
    multilabel: bool = False,
    seed: int = 0,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """Filled circles, rectangles and triangles over a noisy, textured background.

    Args:
      split: 'train', 'validation' or 'test'.
      num_train, num_validation, num_test: examples per split.
      min_size, max_size: image height and width are drawn from [min_size, max_size].
      max_shapes: each image holds 1..max_shapes shapes, later ones drawn over earlier ones.
      colour_jitter: how far a shape's colour strays from its class colour (0 = a pure colour cue).
      noise: standard deviation of the per-pixel Gaussian noise, images in [0, 1].
      outline_width: if > 0, pixels this close to a class boundary get the ignore label 255.
      random_colours: paint every shape in a colour drawn uniformly at random, independent of
        its class (colour_jitter is then unused), so only geometry tells the classes apart.
        Shapes, positions, labels and background are those the same seed gives without it.
      multilabel: labels circle, rectangle, triangle, any of them per pixel (overlapping shapes
        half-transparent, so every shape shows), stored as bits; shapes and positions are
        those the same seed gives without it.
      seed: the dataset seed; the same seed gives the same images everywhere.

    Returns:
      (dataset of {'image': uint8 [H,W,3], 'label': uint8 [H,W]}, DatasetInfo).
    """
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    if split not in sizes:
        raise SegtrainError(
            f"Dataset 'shapes' has no split {split!r}; use one of {', '.join(SPLITS)}."
        )
    if not 8 <= min_size <= max_size:
        raise SegtrainError(
            f"datasets.shapes: need 8 <= min_size <= max_size, got {min_size} and {max_size}."
        )
    if max_shapes < 1:
        raise SegtrainError(f"datasets.shapes.max_shapes must be >= 1, got {max_shapes}.")
    info = DatasetInfo(
        num_classes=len(CLASS_NAMES) - multilabel,  # multi-label: the background is no label
        ignore_label=IGNORE_LABEL,
        class_names=CLASS_NAMES[multilabel:],
        palette=PALETTE[multilabel:],
        num_examples=dict(sizes),
        name="shapes",
        multilabel=multilabel,
    )
    stream = seed * len(SPLITS) + SPLITS.index(split)

    # Plain TF ops and Python loops over Python numbers: nothing for autograph to convert, and
    # converting it cost about half a second at every process start.
    @tf.autograph.experimental.do_not_convert
    def generate(index):
        return draw_example(
            tf.stack([tf.constant(stream, tf.int64), index]),
            min_size=min_size,
            max_size=max_size,
            max_shapes=max_shapes,
            colour_jitter=colour_jitter,
            noise=noise,
            outline_width=outline_width,
            random_colours=random_colours,
            multilabel=multilabel,
        )

    ds = tf.data.Dataset.range(sizes[split]).map(
        generate, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return ds, info


def draw_example(
    seed: tf.Tensor,
    *,
    min_size: int,
    max_size: int,
    max_shapes: int,
    colour_jitter: float,
    noise: float,
    outline_width: int,
    random_colours: bool = False,
    multilabel: bool = False,
) -> dict[str, tf.Tensor]:
    """Draws one example from a stateless seed [2]."""
    streams = tf.unstack(tf.random.experimental.stateless_split(seed, 8 + 3 * max_shapes))
    seeds = iter(streams)
    # The draws below use the first 6 + 3 * max_shapes streams; the random colours come from
    # the last one, so switching them on leaves every other draw (geometry, labels) as it was.
    colour_seeds = (tf.unstack(tf.random.experimental.stateless_split(streams[-1], max_shapes))
                    if random_colours else None)
    hw = tf.random.stateless_uniform([2], next(seeds), min_size, max_size + 1, tf.int32)
    h, w = hw[0], hw[1]
    y, x = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    side = tf.cast(tf.minimum(h, w), tf.float32)

    # Background: a random base colour, two random gratings, and per-pixel noise.
    image = tf.ones([h, w, 3]) * tf.random.stateless_uniform([3], next(seeds), 0.15, 0.75)
    for _ in range(2):
        p = tf.random.stateless_uniform([4], next(seeds))
        freq = 0.05 + 0.4 * p[0]
        angle = 2 * math.pi * p[1]
        wave = tf.sin(freq * (x * tf.cos(angle) + y * tf.sin(angle)) + 2 * math.pi * p[2])
        image += 0.08 * wave[..., None] * (p[3] - 0.5) * 2
    label = tf.zeros([h, w], tf.uint8)

    num_shapes = tf.random.stateless_uniform([], next(seeds), 1, max_shapes + 1, tf.int32)
    class_colours = tf.constant(_CLASS_COLOURS)
    for k in range(max_shapes):
        p = tf.random.stateless_uniform([7], next(seeds))
        cls = tf.random.stateless_uniform([], next(seeds), 1, len(CLASS_NAMES), tf.int32)
        cy, cx = p[0] * tf.cast(h, tf.float32), p[1] * tf.cast(w, tf.float32)
        radius = side * (0.1 + 0.15 * p[2])
        theta = 2 * math.pi * p[3]
        masks = tf.stack(
            [
                _circle(x, y, cx, cy, radius),
                _rectangle(x, y, cx, cy, radius * (0.6 + 0.4 * p[4]), radius * (0.6 + 0.4 * p[5]), theta),
                _triangle(x, y, cx, cy, radius * 1.2, theta),
            ]
        )
        mask = tf.logical_and(tf.gather(masks, cls - 1), k < num_shapes)
        colour = tf.gather(class_colours, cls - 1) + colour_jitter * (
            tf.random.stateless_uniform([3], next(seeds)) - 0.5
        ) * 2
        if random_colours:
            colour = tf.random.stateless_uniform([3], colour_seeds[k])
        colour = colour * (0.9 + 0.2 * p[6])
        if multilabel:  # half-transparent: a shape under another still shows
            image = tf.where(mask[..., None], 0.4 * image + 0.6 * colour, image)
            label = tf.where(mask, label | tf.bitwise.left_shift(tf.constant(1, tf.uint8), tf.cast(cls - 1, tf.uint8)),
                             label)
        else:
            image = tf.where(mask[..., None], colour, image)
            label = tf.where(mask, tf.cast(cls, tf.uint8), label)

    image += noise * tf.random.stateless_normal([h, w, 3], next(seeds))
    image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)
    if outline_width > 0:
        label = _ignore_boundaries(label, outline_width)
    return {"image": image, "label": label}


def _circle(x, y, cx, cy, r):
    return (x - cx) ** 2 + (y - cy) ** 2 <= r**2


def _rectangle(x, y, cx, cy, half_w, half_h, theta):
    u = (x - cx) * tf.cos(theta) + (y - cy) * tf.sin(theta)
    v = -(x - cx) * tf.sin(theta) + (y - cy) * tf.cos(theta)
    return tf.logical_and(tf.abs(u) <= half_w, tf.abs(v) <= half_h)


def _triangle(x, y, cx, cy, r, theta):
    angles = theta + tf.constant([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    vx, vy = cx + r * tf.cos(angles), cy + r * tf.sin(angles)
    sides = []
    for i in range(3):
        j = (i + 1) % 3
        # Sign of the cross product (edge i->j) x (vertex i -> pixel): same sign on all
        # three edges means inside.
        sides.append((vx[j] - vx[i]) * (y - vy[i]) - (vy[j] - vy[i]) * (x - vx[i]) >= 0)
    return tf.logical_and(tf.logical_and(sides[0], sides[1]), sides[2])


def _ignore_boundaries(label: tf.Tensor, width: int) -> tf.Tensor:
    """Sets pixels within ``width`` of a class boundary to the ignore label."""
    lab = tf.cast(label, tf.float32)[None, ..., None]
    size = 2 * width + 1
    high = tf.nn.max_pool2d(lab, size, 1, "SAME")
    low = -tf.nn.max_pool2d(-lab, size, 1, "SAME")
    edge = tf.not_equal(high, low)[0, ..., 0]
    return tf.where(edge, tf.constant(IGNORE_LABEL, tf.uint8), label)
