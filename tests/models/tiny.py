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


def resnet_v2_tiny(input_shape) -> keras.Model:
    """keras.applications' ResNet v2 (pre-activation; downsampling in each stage's last block)."""
    from keras.src.applications.resnet import ResNet, stack_residual_blocks_v2

    def stack_fn(x):
        x = stack_residual_blocks_v2(x, 4, 2, name="conv2")
        x = stack_residual_blocks_v2(x, 8, 2, name="conv3")
        x = stack_residual_blocks_v2(x, 8, 2, name="conv4")
        return stack_residual_blocks_v2(x, 16, 2, stride1=1, name="conv5")

    return ResNet(stack_fn, True, True, include_top=False, weights=None, input_shape=input_shape, name="resnet_v2_tiny")


def convnext_mini(input_shape) -> keras.Model:
    """keras.applications' ConvNeXt (patchify stem, 2x2 downsampling, 7x7 depthwise blocks, one per stage)."""
    from keras.src.applications.convnext import ConvNeXt

    return ConvNeXt([1, 1, 1, 1], [16, 16, 32, 32], include_top=False, weights=None, input_shape=input_shape,
                    include_preprocessing=False, name="convnext_mini")


def efficientnetv2_mini(input_shape) -> keras.Model:
    """keras.applications' EfficientNetV2-B0 blocks (fused and depthwise MBConv) at a quarter width and depth."""
    from keras.src.applications.efficientnet_v2 import DEFAULT_BLOCKS_ARGS, EfficientNetV2

    return EfficientNetV2(0.25, 0.25, 64, blocks_args=DEFAULT_BLOCKS_ARGS["efficientnetv2-b0"], include_top=False,
                          weights=None, input_shape=input_shape, include_preprocessing=False, name="efficientnetv2-mini")


def mobilenetv3_mini(input_shape) -> keras.Model:
    """keras.applications' MobileNetV3-Small (explicit padding before strided depthwise convolutions) at alpha 0.25."""
    return keras.applications.MobileNetV3Small(input_shape=input_shape, alpha=0.25, include_top=False, weights=None,
                                               include_preprocessing=False)


@BACKBONES.register("mit_mini", override=True)
def mit_mini_backbone(weights=None, freeze=False, freeze_batch_norm=False) -> Backbone:
    """SegFormer's Mix Transformer with one block per stage and few channels (multiples of 16)."""
    from segtrain.models.segformer import mix_transformer

    return Backbone("mit_mini", lambda shape: mix_transformer(shape, (16, 32, 80, 128), (1, 1, 1, 1), 0.1, "mit_mini"),
                    None, "torch", weights, freeze, freeze_batch_norm, "tests")


# The small members of each keras.applications family segtrain registers, by the preprocessing
# of their ImageNet weights: the same layer types, names and strides, at a few channels.
FAMILIES = {"resnet_v2_tiny": (resnet_v2_tiny, "tf"), "convnext_mini": (convnext_mini, "torch"),
            "efficientnetv2_mini": (efficientnetv2_mini, "torch"), "mobilenetv3_mini": (mobilenetv3_mini, "tf")}


def _register_family(name, network, preprocessing):
    def factory(weights=None, freeze=False, freeze_batch_norm=False) -> Backbone:
        return Backbone(name, network, None, preprocessing, weights, freeze, freeze_batch_norm, "tests")

    factory.__doc__ = network.__doc__
    BACKBONES.register(name, override=True)(factory)


for _name, (_network, _preprocessing) in FAMILIES.items():
    _register_family(_name, _network, _preprocessing)


# The arguments that shrink each built-in model.
TINY_MODELS: dict[str, dict] = {
    "unet": {"depth": 2, "base_filters": 4},
    "encoder_decoder": {},
    "deeplabv3": {"backbone": "resnet_tiny", "aspp_filters": 8},
    "deeplabv3_plus": {"backbone": "resnet_tiny", "aspp_filters": 8, "low_level_filters": 4, "decoder_filters": 8},
    **{f"fcn{v}s": {"backbone": "vgg_tiny", "fc_filters": 16} for v in (32, 16, 8)},
    "unet_original": {"depth": 2, "base_filters": 4},
    "unet_resnet50": {"backbone": "resnet_tiny", "decoder_filters": (16, 8, 8, 4)},
    "unet_encoder": {"backbone": "resnet_tiny", "decoder_filters": (16, 8, 8, 4)},
    "segformer": {"backbone": "mit_mini", "decoder_dim": 16},
    "unet_compact": {"levels": 3, "base_filters": 4, "max_filters": 16},
    "xception_unet": {"stem_filters": 16, "filters": (16, 32)},  # multiples of 16: see tiny.py doc
}


def bindings(model: str) -> list[str]:
    """Gin bindings that select ``model`` in its tiny form."""
    return [f"train.model = '{model}'"] + [f"models.{model}.{k} = {v!r}" for k, v in TINY_MODELS[model].items()]
