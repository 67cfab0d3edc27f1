"""An Xception-style U-Net: a small Xception (Chollet 2017) as encoder, a U-Net decoder.

The encoder is the small Xception of Keras' Oxford-IIIT Pet segmentation example: residual blocks
of depthwise-separable convolutions with batch norm before each (pre-activation), each block
ending in a strided max pool while a strided 1x1 convolution carries the residual. Here those
blocks form the contracting path; the expanding
path mirrors them with transposed convolutions, concatenated encoder features and residual
separable blocks at stride 1.
"""

from __future__ import annotations

from typing import Sequence

import keras

from registry import MODELS
from segtrain.errors import SegtrainError
from segtrain.models.layers import check_divisible, classifier, image_input
from segtrain.models.model import SegmentationModel


def separable_block(x, filters: int, name: str, downsample: bool):
    """BN-ReLU-SeparableConv twice, plus a 1x1-conv residual; max pool and stride 2 to go down."""
    residual = x
    for i in (1, 2):
        x = keras.layers.BatchNormalization(name=f"{name}.bn{i}")(x)
        x = keras.layers.ReLU(name=f"{name}.relu{i}")(x)
        x = keras.layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}.sepconv{i}")(x)
    strides = 2 if downsample else 1
    if downsample:
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"{name}.pool")(x)
    residual = keras.layers.Conv2D(filters, 1, strides=strides, padding="same", use_bias=False,
                                   name=f"{name}.residual")(residual)
    return keras.layers.Add(name=f"{name}.add")([x, residual])


@MODELS.register("xception_unet")
def xception_unet(
    num_classes: int,
    stem_filters: int = 32,
    filters: Sequence[int] = (64, 128, 256, 512),
    input_shape=None,
) -> keras.Model:
    """U-Net whose encoder is a mini-Xception of residual depthwise-separable blocks.

    Source: Chollet 2017 (Xception, arXiv:1610.02357), in the small form of Keras' Oxford-IIIT Pet example.

    Args:
      num_classes: output channels (logits).
      stem_filters: filters of the 5x5 stem convolution (32, as in Keras' example).
      filters: one downsampling block per entry; inputs need sides divisible by 2**len(filters).
      input_shape: (H, W, 3) to fix the input size, or None.
    """
    if not filters:
        raise SegtrainError("models.xception_unet.filters is empty: give at least one block width.")
    depth = len(filters)
    check_divisible(input_shape, 2**depth, "xception_unet")
    inputs = image_input(input_shape)
    x = keras.layers.Conv2D(stem_filters, 5, padding="same", use_bias=False, name="stem.conv")(inputs)
    skips = []
    for level, width in enumerate(filters):
        skips.append(x)
        x = separable_block(x, width, f"encoder.level{level}", downsample=True)
    for level in reversed(range(depth)):
        name = f"decoder.level{level}"
        width = filters[level - 1] if level else stem_filters
        x = keras.layers.Conv2DTranspose(width, 3, strides=2, padding="same", name=f"{name}.upconv")(x)
        x = keras.layers.Concatenate(name=f"{name}.concat")([x, skips[level]])
        x = separable_block(x, width, name, downsample=False)
    x = keras.layers.BatchNormalization(name="head.bn")(x)
    x = keras.layers.ReLU(name="head.relu")(x)
    return SegmentationModel(inputs, classifier(x, num_classes), name="xception_unet", size_divisor=2**depth,
                             output_stride=2**depth, cam_layer=f"encoder.level{depth - 1}.add")
