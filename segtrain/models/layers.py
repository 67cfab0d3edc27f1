"""Small named building blocks shared by the models.

Keras 3 forbids '/' in layer names, so names show the structure with dots:
``encoder.level2.conv1``.
"""

from __future__ import annotations

import keras

from segtrain.errors import SegtrainError


def conv_bn_relu(
    x,
    filters: int,
    name: str,
    kernel_size: int = 3,
    strides: int = 1,
    batch_norm: bool = True,
    synchronized: bool = False,
):
    """Conv (same padding) -> [BatchNorm] -> ReLU."""
    x = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=not batch_norm,
        name=f"{name}.conv",
    )(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(synchronized=synchronized, name=f"{name}.bn")(x)
    return keras.layers.ReLU(name=f"{name}.relu")(x)


def classifier(x, num_classes: int, kernel_size: int = 1, name: str = "logits"):
    """The final convolution; it computes in float32 so mixed precision never reaches the loss."""
    return keras.layers.Conv2D(
        num_classes, kernel_size, padding="same", dtype="float32", name=name
    )(x)


def image_input(input_shape=None, name: str = "image"):
    """The model input: float images [B, H, W, 3]; H and W may be left open (None)."""
    shape = tuple(input_shape) if input_shape else (None, None, 3)
    return keras.Input(shape=shape, name=name)


def check_divisible(input_shape, divisor: int, model: str) -> None:
    """Raises a clear error when a fixed input size does not suit the model."""
    if not input_shape:
        return
    for dim in input_shape[:2]:
        if dim is not None and dim % divisor:
            raise SegtrainError(
                f"models.{model}.input_shape={tuple(input_shape)}: {model} needs input height and width divisible by {divisor}."
            )
