"""U-Net (Ronneberger et al., 2015) with same padding and batch norm."""

from __future__ import annotations

import keras

from registry import MODELS
from segtrain.errors import SegtrainError
from segtrain.models.layers import check_divisible, classifier, conv_bn_relu, image_input


def double_conv(x, filters: int, name: str, batch_norm: bool, synchronized: bool):
    """The U-Net unit: two 3x3 conv + BN + ReLU."""
    x = conv_bn_relu(x, filters, f"{name}.conv1", batch_norm=batch_norm, synchronized=synchronized)
    return conv_bn_relu(x, filters, f"{name}.conv2", batch_norm=batch_norm, synchronized=synchronized)


def up_block(x, skip, filters: int, name: str, batch_norm: bool, synchronized: bool):
    """2x up-convolution, concatenation with the encoder's skip, double conv."""
    x = keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"{name}.upconv")(x)
    x = keras.layers.Concatenate(name=f"{name}.concat")([x, skip])
    return double_conv(x, filters, name, batch_norm, synchronized)


@MODELS.register("unet")
def unet(
    num_classes: int,
    depth: int = 4,
    base_filters: int = 64,
    batch_norm: bool = True,
    dropout: float = 0.0,
    synchronized_batch_norm: bool = False,
    input_shape=None,
) -> keras.Model:
    """U-Net: `depth` down/up levels, filters doubling per level, same padding, batch norm.

    Args:
      num_classes: output channels (logits).
      depth: number of 2x downsamplings; inputs need height and width divisible by 2**depth.
      base_filters: filters of the first level (64 in the paper).
      batch_norm: batch norm after every convolution.
      dropout: dropout rate at the bottleneck.
      synchronized_batch_norm: batch statistics across replicas.
      input_shape: (H, W, 3) to fix the input size, or None for any size.

    Returns:
      A keras.Model mapping [B,H,W,3] images to [B,H,W,num_classes] float32 logits.
    """
    if depth < 1 or base_filters < 1:
        raise SegtrainError(
            f"models.unet needs depth >= 1 and base_filters >= 1, got {depth} and {base_filters}."
        )
    check_divisible(input_shape, 2**depth, "unet")
    inputs = image_input(input_shape)
    x, skips = inputs, []
    for level in range(depth):
        x = double_conv(x, base_filters * 2**level, f"encoder.level{level}", batch_norm, synchronized_batch_norm)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"encoder.level{level}.pool")(x)
    x = double_conv(x, base_filters * 2**depth, "bottleneck", batch_norm, synchronized_batch_norm)
    if dropout:
        x = keras.layers.Dropout(dropout, name="bottleneck.dropout")(x)
    for level in reversed(range(depth)):
        x = up_block(x, skips[level], base_filters * 2**level, f"decoder.level{level}", batch_norm, synchronized_batch_norm)
    model = keras.Model(inputs, classifier(x, num_classes), name="unet")
    model.size_divisor = 2**depth
    return model
