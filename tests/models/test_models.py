"""Models: the contract (logits at input size, float32 head) and the structure that defines them."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from registry import MODELS
from segtrain.errors import SegtrainError


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (96, 40)])
def test_unet_logits_at_input_size_for_any_divisible_size(size):
    model = MODELS.get("unet")(num_classes=5, depth=3, base_filters=4)
    logits = model(np.zeros((2, *size, 3), np.float32))
    assert logits.shape == (2, *size, 5)
    assert model.size_divisor == 8


def test_unet_structure_skips_and_filters():
    model = MODELS.get("unet")(num_classes=3, depth=3, base_filters=8, input_shape=(64, 64, 3))
    # Filters double per level, down to the bottleneck at 1/8 resolution.
    for level, (filters, side) in enumerate([(8, 64), (16, 32), (32, 16)]):
        out = model.get_layer(f"encoder.level{level}.conv2.relu").output
        assert out.shape[1:] == (side, side, filters)
        # The decoder concatenates the up-convolution with the same-level encoder output.
        concat = model.get_layer(f"decoder.level{level}.concat")
        assert concat.output.shape[1:] == (side, side, 2 * filters)
    assert model.get_layer("bottleneck.conv2.relu").output.shape[1:] == (8, 8, 64)
    assert isinstance(model.get_layer("encoder.level0.conv1.bn"), keras.layers.BatchNormalization)
    assert model.get_layer("encoder.level0.conv1.conv").padding == "same"


def test_final_layer_computes_in_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = MODELS.get("unet")(num_classes=2, depth=1, base_filters=2)
        assert model.get_layer("logits").compute_dtype == "float32"
        assert model(np.zeros((1, 8, 8, 3), np.float32)).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_unet_rejects_a_fixed_size_it_cannot_handle():
    with pytest.raises(SegtrainError, match=r"models.unet.input_shape=\(100, 100, 3\): unet needs input height and width divisible by 16"):
        MODELS.get("unet")(num_classes=2, depth=4, input_shape=(100, 100, 3))


def test_encoder_decoder_matches_the_book():
    model = MODELS.get("encoder_decoder")(num_classes=3, input_shape=(200, 200, 3))
    assert model.count_params() == 2_880_643
    assert model.get_layer("encoder.stage2.conv").output.shape[1:] == (25, 25, 256)
    assert model.output_shape == (None, 200, 200, 3)
    assert model.get_layer("logits").compute_dtype == "float32"
    assert model.get_layer("logits").activation.__name__ == "linear"  # logits, not softmax
