"""Inference: whole images, sliding windows as MMSegmentation places them, test-time augmentation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from segtrain.errors import SegtrainError
from segtrain.inference import Inference, InferenceOptions, num_windows, windows

C = 3


def _pixelwise(seed=0):
    """A 1x1 convolution: each pixel's logits depend on that pixel alone, so every window, scale
    of 1 and flip sees exactly what the whole image gives."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, keras.layers.Conv2D(C, 1)(inputs))


def _images(h=37, w=53, b=2, seed=0):
    return tf.random.stateless_normal([b, h, w, 3], [seed, 1])


@pytest.mark.parametrize("size,crop,stride,expected", [
    ((1024, 2048), (769, 769), (513, 513), 8),
    ((1024, 2048), (1024, 1024), (768, 768), 3),
    ((512, 512), (512, 512), (341, 341), 1),
    ((100, 60), (128, 128), (85, 85), 1),
])
def test_window_counts_match_slide_inference(size, crop, stride, expected):
    rows, cols = num_windows(*size, crop, stride)
    assert rows * cols == expected
    boxes = windows(*size, crop, stride)
    assert len(boxes) == expected
    cover = np.zeros(size, np.int32)
    for top, left, bottom, right in boxes:
        assert bottom - top == min(crop[0], size[0]) and right - left == min(crop[1], size[1])
        assert 0 <= top and 0 <= left and bottom <= size[0] and right <= size[1]
        cover[top:bottom, left:right] += 1
    assert cover.min() >= 1  # every pixel is covered: the count never divides by 0
    # The last window of a row and of a column is flush with the border.
    assert max(b[2] for b in boxes) == size[0] and max(b[3] for b in boxes) == size[1]


@pytest.mark.parametrize("crop,stride", [((16, 16), (10, 10)), ((16, 24), (16, 24)), ((64, 64), (40, 40)),
                                         ((37, 20), (7, 19))])
def test_slide_equals_whole_for_a_pixelwise_model(crop, stride):
    """Overlaps averaged, windows flush with the border, an image smaller than a window padded."""
    model, images = _pixelwise(), _images()
    whole = Inference(model, C).logits(images)
    slide = Inference(model, C, options=InferenceOptions("slide", crop, stride)).logits(images)
    assert slide.shape == whole.shape == (2, 37, 53, C)
    np.testing.assert_allclose(slide, whole, atol=1e-5)


def test_slide_averages_overlapping_windows():
    """A model whose output is its window's mean brightness: the slide logits of a pixel are the
    mean over the windows covering it, as slide_inference computes them."""
    inputs = keras.Input((None, None, 3))
    mean = keras.layers.Lambda(lambda x: tf.ones_like(x[..., :1]) * tf.reduce_mean(x, [1, 2, 3], keepdims=True))(inputs)
    model = keras.Model(inputs, keras.layers.Concatenate()([mean, mean * 0, mean * 0]))
    image = tf.reshape(tf.range(1 * 20 * 30 * 3, dtype=tf.float32), [1, 20, 30, 3])
    got = Inference(model, C, options=InferenceOptions("slide", (16, 16), (8, 8))).logits(image).numpy()[0, ..., 0]
    total, count = np.zeros((20, 30)), np.zeros((20, 30))
    for top, left, bottom, right in windows(20, 30, (16, 16), (8, 8)):
        total[top:bottom, left:right] += image.numpy()[0, top:bottom, left:right].mean()
        count[top:bottom, left:right] += 1
    np.testing.assert_allclose(got, total / count, rtol=1e-5)


def test_size_divisor_pads_and_crops_back():
    model = _pixelwise()
    images = _images(35, 50)
    np.testing.assert_allclose(Inference(model, C, size_divisor=16).logits(images), model(images), atol=1e-5)
    with pytest.raises(SegtrainError, match="multiples of 16"):
        Inference(model, C, size_divisor=16, options=InferenceOptions("slide", (24, 24)))


def test_flip_is_undone_exactly():
    """A pixelwise model commutes with flipping: averaging the un-flipped view changes nothing. A
    model that sees columns (its logits grow left to right) shows the view really is flipped."""
    model, images = _pixelwise(), _images()
    plain = Inference(model, C).probabilities(images)
    flipped = Inference(model, C, options=InferenceOptions(flip=True)).probabilities(images)
    np.testing.assert_allclose(flipped, plain, atol=1e-6)

    inputs = keras.Input((8, 10, 3))
    ramp = keras.layers.Lambda(lambda x: tf.cumsum(tf.ones_like(x[..., :C]), axis=2) + x[..., :C] * 0)(inputs)
    ramp_model = keras.Model(inputs, ramp)
    probs = Inference(ramp_model, C, options=InferenceOptions(flip=True)).probabilities(tf.zeros([1, 8, 10, 3]))
    np.testing.assert_allclose(probs, np.full([1, 8, 10, C], 1 / C), atol=1e-6)  # equal logits per pixel


def test_single_scale_without_flip_is_plain_inference():
    model, images = _pixelwise(), _images()
    options = InferenceOptions(scales=(1.0,), flip=False)
    assert not options.augmented
    np.testing.assert_array_equal(Inference(model, C, options=options).logits(images), model(images))


def test_scales_average_the_softmax_of_resized_views():
    model, images = _pixelwise(), _images(32, 48)
    got = Inference(model, C, options=InferenceOptions(scales=(0.5, 1.0))).probabilities(images).numpy()
    half = tf.image.resize(model(tf.image.resize(images, (16, 24))), (32, 48))
    expected = (tf.nn.softmax(half) + tf.nn.softmax(model(images))) / 2
    np.testing.assert_allclose(got, expected, atol=1e-5)
    logits = Inference(model, C, options=InferenceOptions(scales=(0.5, 1.0))).logits(images)
    np.testing.assert_allclose(tf.nn.softmax(logits), expected, atol=1e-5)  # log of the average


def test_traces_once_for_many_sizes_in_a_tf_function():
    inference = Inference(_pixelwise(), C, size_divisor=8,
                          options=InferenceOptions("slide", (16, 16), scales=(0.75, 1.0), flip=True))
    fn = tf.function(inference.logits, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    for h, w in ((20, 30), (41, 17)):
        assert fn(_images(h, w)).shape == (2, h, w, C)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(mode="tile"), "--mode='tile'"),
    (dict(mode="slide"), "--mode=slide needs --crop_size"),
    (dict(mode="slide", crop_size=(0, 4)), "--crop_size"),
    (dict(scales=("a",)), "--scales"),
    (dict(scales=(0.0,)), "--scales"),
])
def test_bad_options_name_the_flag(kwargs, fragment):
    with pytest.raises(SegtrainError, match=fragment.replace("(", r"\(")):
        InferenceOptions(**kwargs)


def test_options_from_command_line_strings():
    options = InferenceOptions("slide", ["32", "64"], None, ["0.5", "1"], True)
    assert options.crop_size == (32, 64) and options.stride == (22, 43) and options.scales == (0.5, 1.0)
    assert options.describe() == "slide 32x64 every 22x43, scales 0.5,1 + flip"
