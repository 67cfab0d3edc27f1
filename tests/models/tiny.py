"""Tiny versions of every built-in model, for training smoke tests that run in seconds.

The backbones keep keras.applications' structure and layer names (so dilation, feature taps,
freezing and weight loading take the same code paths) with one block per stage and a few
channels. They are registered like any plugin backbone, in ``registry.BACKBONES``.

xception_unet's widths are multiples of 16: on CPUs with AVX-512, TensorFlow 2.21's oneDNN
depthwise-convolution filter gradient corrupts the heap (and the process dies) when the
channel count is not a multiple of the 16-float vector width.
"""

from __future__ import annotations

import keras

from registry import BACKBONES
from segtrain.models.backbones import VGG_STAGES, Backbone, resnet_stages


def resnet_tiny(input_shape) -> keras.Model:
    """keras.applications' ResNet v1 (the ResNet50 code) with one bottleneck block per stage."""
    from keras.src.applications.resnet import ResNet, stack_residual_blocks_v1

    def stack_fn(x):
        x = stack_residual_blocks_v1(x, 4, 1, stride1=1, name="conv2")
        x = stack_residual_blocks_v1(x, 8, 1, name="conv3")
        x = stack_residual_blocks_v1(x, 8, 1, name="conv4")
        return stack_residual_blocks_v1(x, 16, 1, name="conv5")

    return ResNet(stack_fn, False, True, include_top=False, weights=None, input_shape=input_shape, name="resnet_tiny")


def vgg_tiny(input_shape) -> keras.Model:
    """VGG-16's layout and layer names with one 3x3 convolution of few channels per block."""
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate((4, 8, 8, 16, 16), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv1")(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="vgg_tiny")


@BACKBONES.register("resnet_tiny", override=True)
def resnet_tiny_backbone(weights=None, freeze=False, freeze_batch_norm=False) -> Backbone:
    """ResNet-50's structure with one small block per stage ('caffe' preprocessing with weights)."""
    return Backbone("resnet_tiny", resnet_tiny, resnet_stages(), "caffe", weights, freeze, freeze_batch_norm, "tests")


@BACKBONES.register("vgg_tiny", override=True)
def vgg_tiny_backbone(weights=None, freeze=False, freeze_batch_norm=False) -> Backbone:
    """VGG-16's structure with one small convolution per block."""
    return Backbone("vgg_tiny", vgg_tiny, VGG_STAGES, "caffe", weights, freeze, freeze_batch_norm, "tests")


# The arguments that shrink each built-in model.
TINY_MODELS: dict[str, dict] = {
    "unet": {"depth": 2, "base_filters": 4},
    "encoder_decoder": {},
    "deeplabv3": {"backbone": "resnet_tiny", "aspp_filters": 8},
    "deeplabv3_plus": {"backbone": "resnet_tiny", "aspp_filters": 8, "low_level_filters": 4, "decoder_filters": 8},
    **{f"fcn{v}s": {"backbone": "vgg_tiny", "fc_filters": 16} for v in (32, 16, 8)},
    "unet_original": {"depth": 2, "base_filters": 4},
    "unet_resnet50": {"backbone": "resnet_tiny", "decoder_filters": (16, 8, 8, 4)},
    "unet_compact": {"levels": 3, "base_filters": 4, "max_filters": 16},
    "xception_unet": {"stem_filters": 16, "filters": (16, 32)},  # multiples of 16: see tiny.py doc
}


def bindings(model: str) -> list[str]:
    """Gin bindings that select ``model`` in its tiny form."""
    return [f"train.model = '{model}'"] + [f"models.{model}.{k} = {v!r}" for k, v in TINY_MODELS[model].items()]
