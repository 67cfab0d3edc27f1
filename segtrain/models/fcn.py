"""Fully convolutional networks (Long, Shelhamer & Darrell, 2015): FCN-32s, FCN-16s, FCN-8s.

VGG-16's convolutions, its dense layers recast as convolutions (fc6 a 7x7,
fc7 a 1x1), a 1x1 scoring layer, and transposed convolutions initialised to bilinear
interpolation. FCN-16s adds the scores of pool4 to the 2x-upsampled coarse scores; FCN-8s also
adds those of pool3. The pool4/pool3 scoring layers start at zero, as in the paper, so training
begins from the coarser net's prediction.

Same padding replaces the paper's 100-pixel input padding and final crop: inputs need height
and width divisible by 32 (the pipeline pads evaluation images to that).

The three are thin variants of one builder that differ in the finest stride they fuse.
"""

from __future__ import annotations

import keras
import numpy as np

from registry import MODELS, variant
from segtrain.models import backbones
from segtrain.models.layers import check_divisible, image_input
from segtrain.models.model import SegmentationModel


@keras.saving.register_keras_serializable(package="segtrain")
class BilinearUpsampling(keras.initializers.Initializer):
    """A Conv2DTranspose kernel that performs bilinear upsampling, channel by channel."""

    def __call__(self, shape, dtype=None):
        size, _, out_channels, in_channels = shape
        factor = (size + 1) // 2
        center = factor - 1 if size % 2 == 1 else factor - 0.5
        grid = np.ogrid[:size, :size]
        filt = (1 - abs(grid[0] - center) / factor) * (1 - abs(grid[1] - center) / factor)
        kernel = np.zeros(shape, np.float32)
        for c in range(min(out_channels, in_channels)):
            kernel[:, :, c, c] = filt
        return keras.ops.convert_to_tensor(kernel, dtype=dtype)


def upsample(x, num_classes: int, factor: int, name: str, dtype=None):
    """Transposed convolution by ``factor`` (kernel 2x the factor), bilinear at the start."""
    return keras.layers.Conv2DTranspose(
        num_classes, 2 * factor, strides=factor, padding="same", use_bias=False,
        kernel_initializer=BilinearUpsampling(), dtype=dtype, name=name,
    )(x)


def score(x, num_classes: int, name: str, zeros: bool = False):
    """A 1x1 convolution giving class scores at this stride."""
    init = "zeros" if zeros else "glorot_uniform"
    return keras.layers.Conv2D(num_classes, 1, kernel_initializer=init, name=name)(x)


def fcn(
    num_classes: int,
    backbone: str = "vgg16",
    fc_filters: int = 4096,
    dropout: float = 0.5,
    input_shape=None,
    *,
    finest_stride: int,
) -> keras.Model:
    """FCN-``finest_stride``s; see the variants below."""
    name = f"fcn{finest_stride}s"
    check_divisible(input_shape, 32, name)
    encoder = backbones.get(backbone, owner=name)
    inputs = image_input(input_shape)
    strides = {32: (32,), 16: (16, 32), 8: (8, 16, 32)}[finest_stride]
    features = dict(zip(strides, encoder.pyramid(inputs, strides)))
    x = keras.layers.Conv2D(fc_filters, 7, padding="same", activation="relu", name="fc6")(features[32])
    x = keras.layers.Dropout(dropout, name="fc6.dropout")(x)
    x = keras.layers.Conv2D(fc_filters, 1, activation="relu", name="fc7")(x)
    x = keras.layers.Dropout(dropout, name="fc7.dropout")(x)
    x = score(x, num_classes, "score_fr")
    stride = 32
    while stride > finest_stride:  # fuse the next finer pool's scores
        stride //= 2
        x = upsample(x, num_classes, 2, f"score{stride * 2}.up2")
        pool = score(features[stride], num_classes, f"score_pool{stride.bit_length() - 1}", zeros=True)
        x = keras.layers.Add(name=f"fuse_pool{stride.bit_length() - 1}")([x, pool])
    logits = upsample(x, num_classes, finest_stride, "upsample", dtype="float32")
    return SegmentationModel(inputs, logits, name=name, size_divisor=32, output_stride=32,
                             preprocessing=encoder.input_preprocessing, cam_layer="fc7")


_ARGS = """
    Source: Long, Shelhamer & Darrell 2015, arXiv:1411.4038.

    Args:
      num_classes: output channels (logits).
      backbone: 'vgg16' or another registered VGG-like backbone; its weights file and freezing
        are set under backbones.<name>.*.
      fc_filters: channels of fc6 and fc7 (4096 in VGG-16).
      dropout: after fc6 and fc7 (0.5).
      input_shape: (H, W, 3) to fix the input size (divisible by 32), or None.
"""

fcn32s = MODELS.register("fcn32s")(variant(
    fcn, "fcn32s", "FCN-32s: VGG-16, fc6/fc7 as convolutions, one 32x transposed-conv upsampling.\n" + _ARGS,
    finest_stride=32))
fcn16s = MODELS.register("fcn16s")(variant(
    fcn, "fcn16s", "FCN-16s: FCN-32s's scores upsampled 2x and added to pool4's, then 16x upsampling.\n" + _ARGS,
    finest_stride=16))
fcn8s = MODELS.register("fcn8s")(variant(
    fcn, "fcn8s", "FCN-8s: FCN-16s's fused scores upsampled 2x and added to pool3's, then 8x upsampling.\n" + _ARGS,
    finest_stride=8))
