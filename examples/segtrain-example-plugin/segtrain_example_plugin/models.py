"""A context-aggregation network (Yu & Koltun, 2016): dilated 3x3 convolutions, no downsampling.

Importing this module registers the model; segtrain imports it through the
``segtrain.plugins`` entry point declared in pyproject.toml.
"""

from __future__ import annotations

import keras

from registry import MODELS


@MODELS.register
def context_net(num_classes: int, width: int = 32, rates: tuple = (1, 1, 2, 4, 8, 16, 1)) -> keras.Model:
    """Dilated 3x3 convolutions of growing rate at full resolution; any input size.

    Source: Yu & Koltun 2016, arXiv:1511.07122.

    Args:
      num_classes: output channels (logits).
      width: channels of every convolution.
      rates: dilation rate of each 3x3 convolution.
    """
    inputs = keras.Input((None, None, 3), name="image")
    x = inputs
    for i, rate in enumerate(rates):
        x = keras.layers.Conv2D(width, 3, padding="same", dilation_rate=rate, use_bias=False, name=f"context{i}.conv")(x)
        x = keras.layers.BatchNormalization(name=f"context{i}.bn")(x)
        x = keras.layers.ReLU(name=f"context{i}.relu")(x)
    logits = keras.layers.Conv2D(num_classes, 1, dtype="float32", name="logits")(x)  # float32 logits
    return keras.Model(inputs, logits, name="context_net")
