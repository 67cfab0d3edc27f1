"""Small named building blocks shared by the models.

Keras 3 forbids '/' in layer names, so names show the structure with dots:
``encoder.level2.conv1``. Every custom layer is registered with Keras (package ``segtrain``) so
that saved models load back.
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
    dilation_rate: int = 1,
    padding: str = "same",
):
    """Conv -> [BatchNorm] -> ReLU (train.synchronized_batch_norm synchronises every batch norm of a
    model once it is built: segtrain.models.model.synchronize_batch_norm)."""
    x = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, dilation_rate=dilation_rate,
        use_bias=not batch_norm, name=f"{name}.conv",
    )(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{name}.bn")(x)
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


@keras.saving.register_keras_serializable(package="segtrain")
class ResizeLike(keras.layers.Layer):
    """Bilinear resize of ``x`` to the height and width of ``like`` (any size, known at run time).

    It computes in float32: under a mixed policy XLA cannot compile the gradient of a
    half-precision bilinear resize, and a float32 resize is the more accurate one anyway.
    """

    def __init__(self, interpolation: str = "bilinear", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.interpolation = interpolation

    def call(self, x, like):
        import tensorflow as tf

        return tf.image.resize(x, tf.shape(like)[1:3], method=self.interpolation)

    def compute_output_shape(self, x_shape, like_shape):
        return (x_shape[0], like_shape[1], like_shape[2], x_shape[3])

    def get_config(self):
        return {**super().get_config(), "interpolation": self.interpolation}


@keras.saving.register_keras_serializable(package="segtrain")
class CropLike(keras.layers.Layer):
    """Keeps the top-left part of ``x`` the size of ``like``: undoes the extra row or column of
    a 2x upsampling of an odd-sized map, or the padding a model added around its input. Where
    ``x`` is smaller (a backbone that rounds odd sizes down, as MobileNetV3's explicit padding
    does), its last rows or columns are repeated."""

    def call(self, x, like):
        import tensorflow as tf

        size = tf.shape(like)[1:3]
        x = x[:, : size[0], : size[1]]
        missing = tf.maximum(size - tf.shape(x)[1:3], 0)
        return tf.pad(x, [[0, 0], [0, missing[0]], [0, missing[1]], [0, 0]], mode="SYMMETRIC")

    def compute_output_shape(self, x_shape, like_shape):
        return (x_shape[0], like_shape[1], like_shape[2], x_shape[3])


def upsample_like(x, like, name: str):
    """Bilinear upsampling of ``x`` to the size of ``like`` (float32, see ResizeLike)."""
    return ResizeLike(name=name)(x, like)
