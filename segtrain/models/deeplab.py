"""DeepLab v3 (Chen et al., 2017) and DeepLab v3+ (Chen et al., 2018) on a dilated ResNet.

Built the way the papers describe them: the backbone's last stage(s) trade
their stride for dilation so the features stay at 1/16 (or 1/8) of the input; Atrous Spatial
Pyramid Pooling looks at them with a 1x1 convolution, three 3x3 convolutions of growing rate and
an image-level pooling branch whose 1x1-conv output is stretched back to the feature-map size;
a 1x1 projection fuses the five; the classifier's logits are resized bilinearly to the input.
Every resize follows the tensors' run-time sizes, so any input size works (513x513, 320x480).

Both are thin variants of one builder: v3+ adds the decoder. The backbone is a registered one
(``models.deeplabv3.backbone = 'resnet50'``, its weights and freezing under
``backbones.resnet50.*``); DeepLab asks it for its features at ``output_stride``.
"""

from __future__ import annotations

from typing import Sequence

import keras

from registry import MODELS, variant
from segtrain.errors import SegtrainError
from segtrain.models import backbones
from segtrain.models.layers import classifier, conv_bn_relu, image_input, upsample_like
from segtrain.models.model import SegmentationModel

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def aspp(x, filters: int, rates: Sequence[int], dropout: float, name: str = "aspp"):
    """Atrous Spatial Pyramid Pooling: 1x1, 3x3 at each rate, image pooling; concat; 1x1 projection."""
    branches = [conv_bn_relu(x, filters, f"{name}.1x1", kernel_size=1)]
    for rate in rates:
        branches.append(conv_bn_relu(x, filters, f"{name}.rate{rate}", dilation_rate=rate))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}.pool.mean")(x)
    pooled = conv_bn_relu(pooled, filters, f"{name}.pool", kernel_size=1)
    branches.append(upsample_like(pooled, x, f"{name}.pool.resize"))
    x = keras.layers.Concatenate(name=f"{name}.concat")(branches)
    x = conv_bn_relu(x, filters, f"{name}.project", kernel_size=1)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}.dropout")(x)
    return x


def deeplab(
    num_classes: int,
    backbone: str = "resnet50",
    output_stride: int = 16,
    multi_grid: Sequence[int] | None = None,
    aspp_filters: int = 256,
    dropout: float = 0.1,
    input_shape=None,
    *,
    decoder: bool,
    low_level_filters: int = 48,
    decoder_filters: int = 256,
) -> keras.Model:
    """DeepLab v3 (``decoder=False``) or v3+ (``decoder=True``); see the variants below."""
    name = "deeplabv3_plus" if decoder else "deeplabv3"
    if output_stride not in ASPP_RATES:
        raise SegtrainError(f"models.{name}.output_stride={output_stride}: use 16 or 8.")
    encoder = backbones.get(backbone, owner=name)
    inputs = image_input(input_shape)
    strides = (4, 32) if decoder else (32,)
    *low, x = encoder.pyramid(inputs, strides, output_stride=output_stride, multi_grid=multi_grid)
    x = aspp(x, aspp_filters, ASPP_RATES[output_stride], dropout)
    if decoder:
        x = decoder_block(x, low[0], low_level_filters, decoder_filters)
    logits = classifier(x, num_classes)
    # Grad-CAM's layer: the backbone's last stage (before ASPP), the nested backbone's last output.
    cam_layer = f"backbone:{len(strides) - 1}" if decoder else "backbone"
    return SegmentationModel(inputs, upsample_like(logits, inputs, "upsample"), name=name,
                             output_stride=output_stride, preprocessing=encoder.input_preprocessing,
                             cam_layer=cam_layer)


def decoder_block(x, low, low_level_filters: int, filters: int, name: str = "decoder"):
    """v3+'s decoder: the encoder output resized to the stride-4 features (reduced by a 1x1
    convolution), concatenated, and refined by two 3x3 convolutions."""
    low = conv_bn_relu(low, low_level_filters, f"{name}.low_level", kernel_size=1)
    x = upsample_like(x, low, f"{name}.upsample")
    x = keras.layers.Concatenate(name=f"{name}.concat")([x, low])
    x = conv_bn_relu(x, filters, f"{name}.conv1")
    return conv_bn_relu(x, filters, f"{name}.conv2")


_ARGS = """
    Args:
      num_classes: output channels (logits).
      backbone: a registered backbone ('resnet50', 'resnet101', ...); its weights file and
        freezing are set under backbones.<name>.*.
      output_stride: 16 (the last stage dilated by 2; ASPP rates 6/12/18) or 8 (the last two
        by 2 and 4; rates 12/24/36).
      multi_grid: per-block rates of the last stage, times its rate, e.g. (1, 2, 4).
      aspp_filters: channels of every ASPP branch and of the projection (256 in the paper).
      dropout: after the projection.
      input_shape: (H, W, 3) to fix the input size, or None for any size.
"""

deeplabv3 = MODELS.register("deeplabv3")(variant(
    deeplab, "deeplabv3",
    "DeepLab v3: dilated ResNet-50/101 at output stride 16 or 8, ASPP, bilinear upsampling.\n\n"
    "    Source: Chen et al. 2017, arXiv:1706.05587.\n" + _ARGS,
    decoder=False, low_level_filters=48, decoder_filters=256,
))

deeplabv3_plus = MODELS.register("deeplabv3_plus")(variant(
    deeplab, "deeplabv3_plus",
    "DeepLab v3+: the v3 encoder and a decoder that fuses the stride-4 low-level features.\n\n"
    "    The ASPP output is resized to the stride-4 features (``conv2`` of a ResNet), which a 1x1\n"
    "    convolution has reduced to ``low_level_filters`` channels; two 3x3 convolutions refine the\n"
    "    concatenation before the classifier and the final 4x bilinear upsampling.\n\n"
    "    Source: Chen et al. 2018, arXiv:1802.02611.\n" + _ARGS +
    "      low_level_filters: channels of the reduced low-level features (48 in the paper).\n"
    "      decoder_filters: channels of the decoder's 3x3 convolutions (256).\n",
    decoder=True,
))
