"""Training crops drawn as a source region: the same geometry and colours as the step-by-step transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from segtrain.data import transforms as T
from segtrain.data.prepare import decode_prepared, decode_prepared_region
from tests.data import stepwise


def _ramps(h, w):
    """Red is the row, green the column: bilinear resampling keeps them exact (they are linear)."""
    rows, cols = np.mgrid[:h, :w].astype(np.float32)
    return tf.constant(np.stack([rows, cols, np.zeros_like(rows)], -1)), tf.zeros([h, w], tf.uint8)


def _draws(n, image_size, *args, **kwargs):
    """Windows for seeds 0..n-1 in one graph: offsets, extents and sizes, [n, 2] each."""
    def draw(i):
        return tuple(T.random_region(tf.constant(image_size), *_seeds(i)[:2], *args, **kwargs))

    spec = (tf.TensorSpec([2], tf.int32),) * 3
    return [x.numpy() for x in tf.function(lambda: tf.map_fn(draw, tf.range(n, dtype=tf.int64), fn_output_signature=spec))()]


def _seeds(i):
    return tf.unstack(tf.random.experimental.stateless_split(tf.stack([tf.constant(3, tf.int64), tf.cast(i, tf.int64)]), 4))


def _by_region(image, label, seeds, resize, min_scale, max_scale, crop):
    region = T.random_region(tf.shape(label), seeds[0], seeds[1], resize, min_scale, max_scale, crop)
    image, label = T.take_region(image, label, region)
    return T.resize_region(image, label, region.size, None, crop, 255, -1.0)


def _step_by_step(image, label, seeds, resize, min_scale, max_scale, crop):
    if resize:
        image, label = T.resize(image, label, resize)
    image, label = stepwise.random_scale(image, label, seeds[0], min_scale, max_scale)
    return stepwise.random_crop(image, label, seeds[1], crop, 255, -1.0)


@pytest.mark.parametrize("src,resize,scales,crop", [
    ((60, 80), None, (0.5, 2.0), (32, 40)),  # crops, and padding when scaled below the crop
    ((45, 37), (50, 50), (1.0, 1.0), (40, 40)),  # chapter 8: resize, then crop
])
def test_region_crops_the_source_where_the_step_by_step_transforms_do(src, resize, scales, crop):
    image, label = _ramps(*src)
    for i in range(16):
        seeds = _seeds(i)
        new_image, new_label = _by_region(image, label, seeds, resize, *scales, crop)
        old_image, old_label = _step_by_step(image, label, seeds, resize, *scales, crop)
        # The same draws: the same pixels are padding (ignore label) ...
        np.testing.assert_array_equal(new_label.numpy() == 255, old_label.numpy() == 255)
        # ... and every other pixel samples the same source point, within the rounding of the
        # region to whole source pixels (half a pixel) and the clamping at the image's edges.
        valid = old_label.numpy() != 255
        step = max(s / c for s, c in zip(src, resize or src)) / scales[0]
        diff = np.abs(new_image.numpy() - old_image.numpy())[..., :2][valid]
        assert np.median(diff) <= 0.5 + 1e-4, i
        assert diff.max() <= 0.5 + step, i


def test_region_offsets_cover_every_position_uniformly():
    offsets, extents, sizes = _draws(540, [6, 5], crop_size=(4, 3))
    assert np.all(extents == [4, 3]) and np.all(sizes == [4, 3])
    counts = {}
    for key in map(tuple, offsets.tolist()):
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {(r, c) for r in range(3) for c in range(3)}
    assert min(counts.values()) > 0.6 * 60 and max(counts.values()) < 1.4 * 60  # 60 each expected


def test_region_scales_span_the_range_uniformly():
    offsets, extents, _ = _draws(300, [400, 400], None, 0.5, 2.0, (100, 100))
    assert np.all(offsets >= 0) and np.all(offsets + extents <= 400)
    scales = 100 / extents[:, 0]
    assert 0.5 <= scales.min() < 0.55 and 1.9 < scales.max() <= 2.0
    assert abs(np.mean(scales) - 1.25) < 0.07  # uniform on [0.5, 2]


def test_small_scaled_images_are_padded_with_the_ignore_label_on_the_mirrored_side():
    image, label = tf.fill([20, 20, 3], 9.0), tf.ones([20, 20], tf.uint8)
    seeds = _seeds(0)
    region = T.random_region(tf.constant([20, 20]), seeds[0], seeds[1], crop_size=(32, 32))
    assert region.extent.numpy().tolist() == [20, 20] and region.size.numpy().tolist() == [20, 20]
    for mirror, kept in ((False, np.s_[:20, :20]), (True, np.s_[:20, 12:])):
        out_image, out_label = T.resize_region(image, label, region.size, tf.constant(mirror), (32, 32), 255, -1.0)
        expected = np.full((32, 32), 255)
        expected[kept] = 1
        np.testing.assert_array_equal(out_label.numpy(), expected)
        np.testing.assert_array_equal(out_image.numpy()[..., 0], np.where(expected == 1, 9.0, -1.0))


@pytest.mark.parametrize("colour", [
    dict(brightness=0.1, contrast=(0.8, 1.2), hue=0.1),
    dict(brightness=0.2, saturation=(0.5, 1.5)),
    dict(contrast=(0.5, 1.5)),
    dict(),
])
def test_jitter_and_normalize_equals_jitter_then_normalize(colour):
    image = tf.constant(np.random.default_rng(1).uniform(0, 255, (16, 24, 3)).astype(np.float32))
    normalization = T.PREPROCESSING["caffe"]  # per-channel statistics and a channel swap
    for i in range(4):
        seed = tf.constant([i, 5], tf.int64)
        fused = T.jitter_and_normalize(image, seed, normalization, **colour).numpy()
        jittered = stepwise.colour_jitter(image, seed, **colour) if colour else image
        np.testing.assert_allclose(fused, normalization(jittered).numpy(), atol=2e-3, rtol=1e-5)


COLOURS = [
    dict(brightness=0.1, contrast=(0.8, 1.2), hue=0.1),
    dict(brightness=0.2, saturation=(0.5, 1.5), hue=0.3),
    dict(contrast=(0.5, 1.5)),
    dict(),
]


@pytest.mark.parametrize("xla", [False, True])
@pytest.mark.parametrize("colour", COLOURS)
def test_a_batch_finished_on_device_is_jitter_and_normalize_of_each_image(colour, xla):
    images = np.random.default_rng(3).integers(0, 256, (4, 16, 24, 3)).astype(np.uint8)
    images[0, :4] = [0, 0, 0]  # grey and black pixels: hue and saturation have edge cases there
    images[1, :4] = [90, 90, 90]
    normalization = T.PREPROCESSING["caffe"]  # per-channel statistics and a channel swap
    seeds = [tf.constant([i, 9], tf.int64) for i in range(4)]
    draws = [T.colour_draws(seed, **colour) for seed in seeds]
    assert sorted(draws[0]) == sorted(k for k in T.COLOUR_DRAWS if colour.get(k))
    batch = {"image": tf.constant(images), "label": tf.constant(images[..., 0])}
    if draws[0]:
        batch["colour"] = {k: tf.stack([d[k] for d in draws]) for k in draws[0]}
    finish = tf.function(lambda b: T.finish_batch(b, normalization), jit_compile=xla)
    finished, labels = finish(batch)
    assert finished.dtype == tf.float32 and labels.dtype == tf.int32
    np.testing.assert_array_equal(labels.numpy(), images[..., 0])
    for i, seed in enumerate(seeds):
        expected = T.jitter_and_normalize(tf.constant(images[i]), seed, normalization, **colour).numpy()
        np.testing.assert_allclose(finished[i].numpy(), expected, atol=2e-3, rtol=1e-5)


def test_a_finished_batch_is_left_as_it_is():
    image = tf.random.uniform([2, 4, 4, 3])
    finished, labels = T.finish_batch({"image": image, "label": tf.ones([2, 4, 4], tf.uint8)}, T.Normalization())
    assert finished is image and labels.dtype == tf.int32


def test_normalize_is_the_same_for_known_and_unknown_shapes():
    image = tf.constant(np.random.default_rng(2).uniform(0, 255, (8, 6, 3)).astype(np.float32))
    dynamic = tf.function(lambda x: T.normalize(x, T.IMAGENET_MEAN, T.IMAGENET_STD),
                          input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
    expected = (image.numpy() - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD)
    np.testing.assert_allclose(T.normalize(image, T.IMAGENET_MEAN, T.IMAGENET_STD).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(dynamic(image).numpy(), expected, atol=1e-5)
    batch = tf.stack([image, 255.0 - image])  # a batch of known shape: constants of one image
    np.testing.assert_allclose(T.normalize(batch, T.IMAGENET_MEAN, T.IMAGENET_STD).numpy()[1],
                               (255.0 - image.numpy() - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD), atol=1e-5)


def _encoded(pixels, fmt):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **({"quality": 90} if fmt == "jpeg" else {}))
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_prepared_region_decodes_the_pixels_a_full_decode_has_there(fmt):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    label = rng.integers(0, 21, (37, 53), dtype=np.uint8)
    example = {"image": tf.constant(_encoded(pixels, fmt)), "label": tf.constant(_encoded(label, "png")),
               "key": tf.constant("k")}
    full = decode_prepared(example)
    for offset, extent in (((0, 0), (37, 53)), ((5, 11), (20, 30)), ((36, 52), (1, 1)), ((17, 0), (20, 53))):
        seen = []
        region = decode_prepared_region(example, lambda size: seen.append(size.numpy().tolist())
                                        or (tf.constant(offset), tf.constant(extent)))
        assert seen == [[37, 53]]  # chosen from the full size
        rows, cols = slice(offset[0], offset[0] + extent[0]), slice(offset[1], offset[1] + extent[1])
        np.testing.assert_array_equal(region["image"].numpy(), full["image"].numpy()[rows, cols])
        np.testing.assert_array_equal(region["label"].numpy(), label[rows, cols])


def test_read_time_label_changes_apply_to_decoded_regions_too(tmp_path):
    from registry import DATASETS
    from segtrain.data import pets
    from segtrain.data.prepare import prepare
    from tests.data import fabricate as F

    labels = F.pets(str(tmp_path / "raw"), {"trainval": ["beagle_12"], "test": ["pug_7"]})
    prepare(pets.OxfordIiitPet(), str(tmp_path / "raw"), str(tmp_path / "out"), num_workers=1)
    ds, info = DATASETS.original("oxford_iiit_pet")("test", data_dir=str(tmp_path / "out"), boundary_as_ignore=True)
    example = next(iter(ds))
    want = labels["pug_7"].copy()
    want[want == 2] = 255
    region = info.decode_region(example, lambda size: (tf.constant([1, 2]), size - 3))
    np.testing.assert_array_equal(region["label"].numpy(), want[1:-2, 2:-1])
