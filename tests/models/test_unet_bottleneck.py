"""The U-Net's dilated bottleneck (models.unet.bottleneck_dilations): wider context, same contract."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from registry import MODELS
from segtrain.errors import SegtrainError


def test_dilated_bottleneck_adds_one_residual_conv_per_rate():
    plain = MODELS.get("unet")(num_classes=3, depth=2, base_filters=4, input_shape=(32, 32, 3))
    model = MODELS.get("unet")(num_classes=3, depth=2, base_filters=4, bottleneck_dilations=(2, 4),
                               input_shape=(32, 32, 3))
    for i, rate in enumerate((2, 4), start=1):
        conv = model.get_layer(f"bottleneck.dilated{i}.conv")
        assert conv.dilation_rate == (rate, rate) and conv.kernel_size == (3, 3) and conv.padding == "same"
        assert isinstance(model.get_layer(f"bottleneck.dilated{i}.bn"), keras.layers.BatchNormalization)
        # Added to its input: the bottleneck's features (8x8 at depth 2 of 32, 16 filters) pass on.
        add = model.get_layer(f"bottleneck.dilated{i}.add")
        assert isinstance(add, keras.layers.Add) and add.output.shape[1:] == (8, 8, 16)
    assert not any(layer.name.startswith("bottleneck.dilated") for layer in plain.layers)
    extra = 2 * (3 * 3 * 16 * 16 + 4 * 16)  # two 3x3 convs without bias, each with batch norm
    assert model.count_params() == plain.count_params() + extra
    # The contract holds: logits at any divisible input size, and the Grad-CAM layer exists.
    free = MODELS.get("unet")(num_classes=3, depth=2, base_filters=4, bottleneck_dilations=(2, 4, 8))
    assert free(np.zeros((2, 24, 40, 3), np.float32)).shape == (2, 24, 40, 3)
    assert model(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 32, 32, 3)
    model.get_layer(model.cam_layer)


@pytest.mark.parametrize("rates, bad", [((2, 0), "0"), ((2, 1.5), "1.5"), ((True,), "True"), (2, "2")])
def test_a_bad_dilation_rate_is_refused_by_name(rates, bad):
    with pytest.raises(SegtrainError, match=rf"models\.unet\.bottleneck_dilations=.*{bad}"):
        MODELS.get("unet")(num_classes=3, depth=2, base_filters=4, bottleneck_dilations=rates)
