"""A backbone plugin: a small residual network that any segtrain model with a backbone can use.

Importing this module registers ``small_resnet`` in ``registry.BACKBONES``; segtrain imports it
through the ``segtrain.plugins`` entry point declared in pyproject.toml. Then, in gin:

    models.deeplabv3.backbone = 'small_resnet'
    backbones.small_resnet.width = 16
"""

from __future__ import annotations

import keras

from registry import BACKBONES
from segtrain.models.backbones import Backbone


def residual_stage(x, filters: int, name: str, stride: int):
    """Two 3x3 convolutions with batch norm and a projected shortcut; ``stride`` downsamples."""
    shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_0_conv")(x)
    x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_1_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_1_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_1_relu")(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_2_bn")(x)
    x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def small_resnet_network(input_shape, width: int) -> keras.Model:
    """Five stages, each halving the resolution with a strided convolution (strides 2 to 32)."""
    inputs = keras.Input(input_shape)
    x = inputs
    for stage in range(1, 6):
        x = residual_stage(x, width * min(2 ** (stage - 1), 8), f"stage{stage}", stride=2)
    return keras.Model(inputs, x, name="small_resnet")


@BACKBONES.register
def small_resnet(weights: str | None = None, freeze: bool = False, freeze_batch_norm: bool = False,
                 width: int = 32) -> Backbone:
    """A small residual network: five strided stages, widths doubling up to 8x ``width``.

    Source: the segtrain example plugin.

    Args:
      weights: None (random), or a local .weights.h5 file saved from this network.
      freeze: do not train the backbone.
      freeze_batch_norm: keep its batch norm statistics and scales as loaded.
      width: channels of the first stage (keep it a multiple of 16 on CPUs with AVX-512).
    """
    return Backbone(
        name="small_resnet",
        build=lambda shape: small_resnet_network(shape, width),
        stages={2 ** k: rf"stage{k}_.*" for k in range(1, 6)},  # stride -> the layers of its stage
        preprocessing="torch",  # what weights trained with the pipeline's default normalisation expect
        weights=weights,
        freeze=freeze,
        freeze_batch_norm=freeze_batch_norm,
        source="the segtrain example plugin",
    )
