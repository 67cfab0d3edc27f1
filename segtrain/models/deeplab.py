"""DeepLab v3 (Chen et al., 2017) and DeepLab v3+ (Chen et al., 2018) on a dilated ResNet.

The chapter 8 model, built the way the papers describe it: the backbone's last stage(s) trade
their stride for dilation so the features stay at 1/16 (or 1/8) of the input; Atrous Spatial
Pyramid Pooling looks at them with a 1x1 convolution, three 3x3 convolutions of growing rate and
an image-level pooling branch whose 1x1-conv output is stretched back to the feature-map size;
a 1x1 projection fuses the five; the classifier's logits are resized bilinearly to the input.
Every resize follows the tensors' run-time sizes, so any input size works (513x513, 320x480).
"""

from __future__ import annotations

from typing import Sequence

import keras

from registry import MODELS
from segtrain.errors import SegtrainError
from segtrain.models.backbones import features as backbone_features
from segtrain.models.layers import classifier, conv_bn_relu, image_input, upsample_like

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def aspp(x, filters: int, rates: Sequence[int], dropout: float, synchronized: bool, name: str = "aspp"):
    """Atrous Spatial Pyramid Pooling: 1x1, 3x3 at each rate, image pooling; concat; 1x1 projection."""
    branches = [conv_bn_relu(x, filters, f"{name}.1x1", kernel_size=1, synchronized=synchronized)]
    for rate in rates:
        branches.append(conv_bn_relu(x, filters, f"{name}.rate{rate}", dilation_rate=rate, synchronized=synchronized))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}.pool.mean")(x)
    pooled = conv_bn_relu(pooled, filters, f"{name}.pool", kernel_size=1, synchronized=synchronized)
    branches.append(upsample_like(pooled, x, f"{name}.pool.resize"))
    x = keras.layers.Concatenate(name=f"{name}.concat")(branches)
    x = conv_bn_relu(x, filters, f"{name}.project", kernel_size=1, synchronized=synchronized)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}.dropout")(x)
    return x


def _check(output_stride: int, name: str) -> None:
    if output_stride not in ASPP_RATES:
        raise SegtrainError(f"models.{name}.output_stride={output_stride}: use 16 or 8.")


def _encoder(name, inputs, backbone, backbone_weights, output_stride, multi_grid, freeze_backbone,
             freeze_batch_norm, strides):
    _check(output_stride, name)
    return backbone_features(
        inputs, backbone, strides, weights=backbone_weights, output_stride=output_stride,
        multi_grid=multi_grid, freeze=freeze_backbone, freeze_batch_norm=freeze_batch_norm, owner=name,
    )


@MODELS.register("deeplabv3")
def deeplabv3(
    num_classes: int,
    backbone: str = "resnet50",
    output_stride: int = 16,
    multi_grid: Sequence[int] | None = None,
    aspp_filters: int = 256,
    dropout: float = 0.1,
    backbone_weights: str | None = None,
    freeze_backbone: bool = False,
    freeze_batch_norm: bool = False,
    synchronized_batch_norm: bool = False,
    input_shape=None,
) -> keras.Model:
    """DeepLab v3: dilated ResNet-50/101 at output stride 16 or 8, ASPP, bilinear upsampling.

    Source: Chen et al. 2017, arXiv:1706.05587.

    Args:
      num_classes: output channels (logits).
      backbone: 'resnet50' or 'resnet101' (keras.applications structure).
      output_stride: 16 (conv5 dilated by 2; ASPP rates 6/12/18) or 8 (conv4 by 2, conv5 by
        4; rates 12/24/36).
      multi_grid: per-block rates of the last stage, times its rate, e.g. (1, 2, 4).
      aspp_filters: channels of every ASPP branch and of the projection (256 in the paper).
      dropout: after the projection.
      backbone_weights: None, or a local keras.applications weights file (include_top=False).
      freeze_backbone: train only the head.
      freeze_batch_norm: keep the backbone's batch norm statistics and scales fixed.
      synchronized_batch_norm: batch statistics of the head across replicas.
      input_shape: (H, W, 3) to fix the input size, or None for any size.
    """
    inputs = image_input(input_shape)
    (x,) = _encoder("deeplabv3", inputs, backbone, backbone_weights, output_stride, multi_grid,
                    freeze_backbone, freeze_batch_norm, strides=(32,))
    x = aspp(x, aspp_filters, ASPP_RATES[output_stride], dropout, synchronized_batch_norm)
    logits = classifier(x, num_classes)
    model = keras.Model(inputs, upsample_like(logits, inputs, "upsample"), name="deeplabv3")
    model.output_stride = output_stride
    return model


@MODELS.register("deeplabv3_plus")
def deeplabv3_plus(
    num_classes: int,
    backbone: str = "resnet50",
    output_stride: int = 16,
    multi_grid: Sequence[int] | None = None,
    aspp_filters: int = 256,
    low_level_filters: int = 48,
    decoder_filters: int = 256,
    dropout: float = 0.1,
    backbone_weights: str | None = None,
    freeze_backbone: bool = False,
    freeze_batch_norm: bool = False,
    synchronized_batch_norm: bool = False,
    input_shape=None,
) -> keras.Model:
    """DeepLab v3+: the v3 encoder and a decoder that fuses the stride-4 low-level features.

    The ASPP output is resized to the stride-4 features (``conv2`` of the ResNet), which a 1x1
    convolution has reduced to ``low_level_filters`` channels; two 3x3 convolutions refine the
    concatenation before the classifier and the final 4x bilinear upsampling.

    Source: Chen et al. 2018, arXiv:1802.02611.

    Args:
      num_classes: output channels (logits).
      backbone, output_stride, multi_grid, aspp_filters, dropout, backbone_weights,
        freeze_backbone, freeze_batch_norm, synchronized_batch_norm, input_shape: as deeplabv3.
      low_level_filters: channels of the reduced low-level features (48 in the paper).
      decoder_filters: channels of the decoder's 3x3 convolutions (256).
    """
    sync = synchronized_batch_norm
    inputs = image_input(input_shape)
    low, x = _encoder("deeplabv3_plus", inputs, backbone, backbone_weights, output_stride, multi_grid,
                      freeze_backbone, freeze_batch_norm, strides=(4, 32))
    x = aspp(x, aspp_filters, ASPP_RATES[output_stride], dropout, sync)
    low = conv_bn_relu(low, low_level_filters, "decoder.low_level", kernel_size=1, synchronized=sync)
    x = upsample_like(x, low, "decoder.upsample")
    x = keras.layers.Concatenate(name="decoder.concat")([x, low])
    x = conv_bn_relu(x, decoder_filters, "decoder.conv1", synchronized=sync)
    x = conv_bn_relu(x, decoder_filters, "decoder.conv2", synchronized=sync)
    logits = classifier(x, num_classes)
    model = keras.Model(inputs, upsample_like(logits, inputs, "upsample"), name="deeplabv3_plus")
    model.output_stride = output_stride
    return model
