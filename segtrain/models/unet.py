"""U-Net (Ronneberger et al., 2015) with same padding and batch norm."""

from __future__ import annotations

import keras

from registry import MODELS
from segtrain.errors import SegtrainError, warn
from segtrain.models import backbones
from segtrain.models.layers import CropLike, check_divisible, classifier, conv_bn_relu, image_input
from segtrain.models.model import SegmentationModel


def double_conv(x, filters: int, name: str, batch_norm: bool):
    """The U-Net unit: two 3x3 conv + BN + ReLU."""
    x = conv_bn_relu(x, filters, f"{name}.conv1", batch_norm=batch_norm)
    return conv_bn_relu(x, filters, f"{name}.conv2", batch_norm=batch_norm)


def up_block(x, skip, filters: int, name: str, batch_norm: bool):
    """2x up-convolution, concatenation with the encoder's skip, double conv."""
    x = keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"{name}.upconv")(x)
    x = keras.layers.Concatenate(name=f"{name}.concat")([x, skip])
    return double_conv(x, filters, name, batch_norm)


def dilated_context(x, filters: int, rates, name: str, batch_norm: bool):
    """One 3x3 conv + BN + ReLU per rate, at that dilation, each added to its input.

    The residual sums keep the plain bottleneck's features reachable, so the extra layers start
    as a refinement rather than a detour the first steps must learn through.
    """
    for i, rate in enumerate(rates, start=1):
        y = conv_bn_relu(x, filters, f"{name}.dilated{i}", batch_norm=batch_norm,
                         dilation_rate=rate)
        x = keras.layers.Add(name=f"{name}.dilated{i}.add")([x, y])
    return x


def check_dilations(rates, model: str) -> tuple[int, ...]:
    """``rates`` as a tuple of ints >= 1, or a SegtrainError naming the binding and the bad value."""
    binding = f"models.{model}.bottleneck_dilations"
    if not isinstance(rates, (tuple, list)):
        raise SegtrainError(f"{binding}={rates!r}: give a tuple of dilation rates, e.g. (2, 4, 8), or () for none.")
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
            raise SegtrainError(
                f"{binding}={tuple(rates)!r}: every dilation rate must be an integer >= 1, got {rate!r}."
            )
    return tuple(rates)


@MODELS.register("unet")
def unet(
    num_classes: int,
    depth: int = 4,
    base_filters: int = 64,
    batch_norm: bool = True,
    dropout: float = 0.0,
    bottleneck_dilations: tuple[int, ...] = (),
    input_shape=None,
) -> keras.Model:
    """U-Net: `depth` down/up levels, filters doubling per level, same padding, batch norm.

    With ``bottleneck_dilations`` the bottleneck also sees context beyond its 3x3 windows, as the
    dilated convolutions of DeepLab do, at the cost of a few small convolutions at the lowest
    resolution: after its double conv, one 3x3 conv + BN + ReLU per rate, at that dilation,
    each added to its input (layers ``bottleneck.dilated1``, ``bottleneck.dilated2``, ...).

    Source: Ronneberger et al. 2015, with same padding and batch norm.

    Args:
      num_classes: output channels (logits).
      depth: number of 2x downsamplings; inputs need height and width divisible by 2**depth.
      base_filters: filters of the first level (64 in the paper).
      batch_norm: batch norm after every convolution.
      dropout: dropout rate at the bottleneck.
      bottleneck_dilations: dilation rates of the extra bottleneck convolutions, e.g. (2, 4, 8);
        () for none (the plain U-Net).
      input_shape: (H, W, 3) to fix the input size, or None for any size.

    Returns:
      A keras.Model mapping [B,H,W,3] images to [B,H,W,num_classes] float32 logits.

    Raises:
      SegtrainError: depth or base_filters below 1, a dilation rate that is not an integer >= 1,
        or a fixed input size not divisible by 2**depth.
    """
    if depth < 1 or base_filters < 1:
        raise SegtrainError(
            f"models.unet needs depth >= 1 and base_filters >= 1, got {depth} and {base_filters}."
        )
    dilations = check_dilations(bottleneck_dilations, "unet")
    check_divisible(input_shape, 2**depth, "unet")
    inputs = image_input(input_shape)
    x, skips = inputs, []
    for level in range(depth):
        x = double_conv(x, base_filters * 2**level, f"encoder.level{level}", batch_norm)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"encoder.level{level}.pool")(x)
    x = double_conv(x, base_filters * 2**depth, "bottleneck", batch_norm)
    x = dilated_context(x, base_filters * 2**depth, dilations, "bottleneck", batch_norm)
    if dropout:
        x = keras.layers.Dropout(dropout, name="bottleneck.dropout")(x)
    for level in reversed(range(depth)):
        x = up_block(x, skips[level], base_filters * 2**level, f"decoder.level{level}", batch_norm)
    return SegmentationModel(inputs, classifier(x, num_classes), name="unet", size_divisor=2**depth,
                             output_stride=2**depth, cam_layer="bottleneck.conv2.relu")


def valid_unet_sizes(size: int, depth: int) -> tuple[int, int, int]:
    """(input, output, margin) of the smallest valid-convolution U-Net tile covering ``size``.

    Each level loses 4 pixels to its two unpadded 3x3 convolutions and must pool an even size;
    the valid output is centred in the input, ``margin`` pixels in from each side.
    """
    scale = 2**depth
    bottom = max(5, -(-(size + 8 * scale - 4) // scale))  # smallest bottleneck input that covers
    return scale * bottom + 4 * (scale - 1), scale * bottom - 8 * scale + 4, 6 * scale - 4


@keras.saving.register_keras_serializable(package="segtrain")
class OverlapTilePad(keras.layers.Layer):
    """Mirror-pads images so a valid-convolution U-Net's output covers the whole image.

    The overlap-tile strategy of the U-Net paper: context missing at the border is filled by
    reflection. Padding may exceed the image (reflection repeats), and sizes known only at run
    time work, so the model keeps the contract "logits at input size" for any input.
    """

    def __init__(self, depth: int, **kwargs):
        super().__init__(**kwargs)
        self.depth = depth

    def call(self, images):
        import tensorflow as tf

        scale, margin = 2**self.depth, 6 * 2**self.depth - 4
        for axis in (1, 2):
            size = tf.shape(images)[axis]
            # A ceiling division of positive numbers only (see the floormod below).
            bottom = tf.maximum(5, (size + 8 * scale - 4 + scale - 1) // scale)
            padded = scale * bottom + 4 * (scale - 1)
            # Reflection without repeating the edge pixel, periodic for pads longer than the image.
            period = tf.maximum(2 * (size - 1), 1)
            # Shifted by whole periods to be non-negative first: converters (tf2onnx) compute an
            # integer floormod of a negative number as a truncating remainder.
            index = tf.range(padded) - margin + period * (margin // period + 1)
            index = tf.math.floormod(index, period)
            index = tf.where(index >= size, period - index, index)
            images = tf.gather(images, index, axis=axis)
        return images

    def compute_output_shape(self, shape):
        sizes = [None if s is None else valid_unet_sizes(s, self.depth)[0] for s in shape[1:3]]
        return (shape[0], *sizes, shape[3])

    def get_config(self):
        return {**super().get_config(), "depth": self.depth}


@MODELS.register("unet_original")
def unet_original(
    num_classes: int,
    depth: int = 4,
    base_filters: int = 64,
    batch_norm: bool = False,
    dropout: float = 0.5,
    input_shape=None,
) -> keras.Model:
    """The original U-Net: unpadded 3x3 convolutions, crop-and-concat skips, overlap-tile input.

    A 572x572 tile gives a 388x388 output in the paper. Here the model mirror-pads any input to
    the smallest tile whose valid output covers it and returns logits at the input size, so it
    trains and evaluates like every other model.

    Source: Ronneberger et al. 2015, arXiv:1505.04597.

    Args:
      num_classes: output channels (logits).
      depth: number of 2x downsamplings (4 in the paper).
      base_filters: filters of the first level (64).
      batch_norm: batch norm after every convolution (the paper has none).
      dropout: at the end of the contracting path (0.5 in the paper).
      input_shape: (H, W, 3) to fix the input size, or None for any size.
    """
    if depth < 1 or base_filters < 1:
        raise SegtrainError(
            f"models.unet_original needs depth >= 1 and base_filters >= 1, got {depth} and {base_filters}."
        )
    inputs = image_input(input_shape)
    x, skips = OverlapTilePad(depth, name="overlap_tile")(inputs), []
    for level in range(depth):
        x = _valid_double_conv(x, base_filters * 2**level, f"encoder.level{level}", batch_norm)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"encoder.level{level}.pool")(x)
    x = _valid_double_conv(x, base_filters * 2**depth, "bottleneck", batch_norm)
    if dropout:
        x = keras.layers.Dropout(dropout, name="bottleneck.dropout")(x)
    for level in reversed(range(depth)):
        name = f"decoder.level{level}"
        x = keras.layers.Conv2DTranspose(base_filters * 2**level, 2, strides=2, name=f"{name}.upconv")(x)
        skip = CenterCropLike(name=f"{name}.crop")(skips[level], x)
        x = keras.layers.Concatenate(name=f"{name}.concat")([x, skip])
        x = _valid_double_conv(x, base_filters * 2**level, name, batch_norm)
    logits = CropLike(dtype="float32", name="crop")(classifier(x, num_classes), inputs)
    return SegmentationModel(inputs, logits, name="unet_original", output_stride=2**depth,
                             cam_layer="bottleneck.conv2.relu")


def _valid_double_conv(x, filters: int, name: str, batch_norm: bool):
    x = conv_bn_relu(x, filters, f"{name}.conv1", batch_norm=batch_norm, padding="valid")
    return conv_bn_relu(x, filters, f"{name}.conv2", batch_norm=batch_norm, padding="valid")


@keras.saving.register_keras_serializable(package="segtrain")
class CenterCropLike(keras.layers.Layer):
    """The centre of ``x`` the size of ``like``: the U-Net paper's crop of the skip connection."""

    def call(self, x, like):
        import tensorflow as tf

        offset = (tf.shape(x)[1:3] - tf.shape(like)[1:3]) // 2
        size = tf.shape(like)[1:3]
        return x[:, offset[0]: offset[0] + size[0], offset[1]: offset[1] + size[1]]

    def compute_output_shape(self, x_shape, like_shape):
        return (x_shape[0], like_shape[1], like_shape[2], x_shape[3])


def encoder_unet(num_classes: int, backbone: str, decoder_filters: tuple, input_shape, *, name: str) -> keras.Model:
    """A U-Net decoder on a registered backbone's stride-16 features; see unet_encoder."""
    if len(decoder_filters) != 4:
        raise SegtrainError(f"models.{name}.decoder_filters={decoder_filters!r}: give 4 widths (strides 8, 4, 2, 1).")
    encoder = backbones.get(backbone, owner=name)
    available = encoder.strides()
    skips = [s for s in (2, 4, 8) if s in available]  # ConvNeXt starts at stride 4: no stride-2 skip
    inputs = image_input(input_shape)
    *features, x = encoder.pyramid(inputs, (*skips, 16))
    features = dict(zip(skips, features))
    for filters, stride in zip(decoder_filters, (8, 4, 2)):
        step = f"decoder.stride{stride}"
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, activation="relu", name=f"{step}.upconv")(x)
        if stride in features:
            x = CropLike(name=f"{step}.crop")(x, features[stride])
            x = keras.layers.Concatenate(name=f"{step}.concat")([x, features[stride]])
        x = double_conv(x, filters, step, batch_norm=True)
    x = keras.layers.Conv2DTranspose(decoder_filters[3], 2, strides=2, activation="relu", name="decoder.stride1.upconv")(x)
    x = CropLike(name="decoder.stride1.crop")(x, inputs)
    x = double_conv(x, decoder_filters[3], "decoder.stride1", batch_norm=True)
    # The encoder's stride-16 features: the last of the nested backbone model's outputs.
    return SegmentationModel(inputs, classifier(x, num_classes), name=name, output_stride=16,
                             preprocessing=encoder.input_preprocessing, cam_layer=f"backbone:{len(skips)}")


@MODELS.register("unet_encoder")
def unet_encoder(
    num_classes: int,
    backbone: str = "resnet50",
    decoder_filters: tuple = (512, 256, 64, 32),
    input_shape=None,
) -> keras.Model:
    """U-Net decoder on any registered backbone, up to its stride-16 stage.

    Each decoder step is a 2x2 stride-2 transposed convolution, concatenation with the encoder
    features of the same stride (8, 4 and 2, where the backbone has them: ConvNeXt starts at
    stride 4), and two 3x3 convolutions; a last transposed convolution returns to the input
    size. Same padding, so any input size works: a 2x-upsampled odd-sized map is cropped to its
    skip.

    Source: U-Net decoder (Ronneberger et al. 2015) on a registered encoder.

    Args:
      num_classes: output channels (logits).
      backbone: a registered backbone ('resnet50', 'convnext_tiny', 'mobilenetv3_large', ...);
        its weights and freezing are set under backbones.<name>.*.
      decoder_filters: filters of the steps to strides 8, 4, 2 and 1.
      input_shape: (H, W, 3) to fix the input size, or None for any size.
    """
    return encoder_unet(num_classes, backbone, decoder_filters, input_shape, name="unet_encoder")


@MODELS.register("unet_resnet50")
def unet_resnet50(
    num_classes: int,
    backbone: str = "resnet50",
    decoder_filters: tuple = (512, 256, 64, 32),
    input_shape=None,
) -> keras.Model:
    """U-Net with a ResNet-50 encoder (up to conv4, stride 16): unet_encoder on 'resnet50'.

    Skips from the conv3, conv2 and conv1 outputs. The same network as ``unet_encoder`` with
    ``backbone='resnet50'``, under the name its runs and configurations were saved with.

    Source: U-Net decoder on a ResNet-50 encoder (He et al. 2016).

    Args:
      num_classes: output channels (logits).
      backbone: a registered ResNet ('resnet50' or 'resnet101'); another backbone belongs in
        unet_encoder.
      decoder_filters: filters of the steps to strides 8, 4, 2 and 1.
      input_shape: (H, W, 3) to fix the input size, or None for any size.
    """
    if backbone != "resnet50":  # the model's name says ResNet-50: say what is built instead
        warn(f"models.unet_resnet50.backbone={backbone!r}: building the U-Net decoder on {backbone}, not on the "
             f"ResNet-50 the model's name says (models.unet_encoder takes any backbone).")
    return encoder_unet(num_classes, backbone, decoder_filters, input_shape, name="unet_resnet50")


@MODELS.register("unet_compact")
def unet_compact(
    num_classes: int,
    levels: int = 6,
    base_filters: int = 128,
    max_filters: int = 512,
    input_shape=None,
) -> keras.Model:
    """A compact U-Net of strided convolutions down and transposed convolutions up (no pooling).

    Encoder: ``levels`` stride-2 3x3 convolutions with LeakyReLU, filters doubling from
    ``base_filters`` and capped at ``max_filters`` (256x256 -> 4x4 with the defaults). Decoder:
    stride-2 3x3 transposed convolutions with ReLU, each concatenated with the encoder output of
    the same size; a last transposed convolution gives the logits at input size. No batch norm.

    Source: Ronneberger et al. 2015 (arXiv:1505.04597), with strided and transposed convolutions.

    Args:
      num_classes: output channels (logits).
      levels: number of stride-2 downsamplings; inputs need sides divisible by 2**levels.
      base_filters: filters of the first level (128).
      max_filters: cap on the filters (512).
      input_shape: (H, W, 3) to fix the input size, or None.
    """
    if levels < 1:
        raise SegtrainError(f"models.unet_compact.levels={levels}: needs at least 1.")
    check_divisible(input_shape, 2**levels, "unet_compact")
    widths = [min(base_filters * 2**i, max_filters) for i in range(levels)]
    inputs = image_input(input_shape)
    x, skips = inputs, []
    for level, filters in enumerate(widths):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", kernel_initializer="he_normal",
                                name=f"encoder.level{level}.conv")(x)
        x = keras.layers.LeakyReLU(name=f"encoder.level{level}.leaky_relu")(x)
        skips.append(x)
    for level in reversed(range(levels - 1)):  # up to the size of each skip but the deepest
        name = f"decoder.level{level}"
        x = keras.layers.Conv2DTranspose(widths[level + 1], 3, strides=2, padding="same",
                                         kernel_initializer="he_normal", name=f"{name}.upconv")(x)
        x = keras.layers.ReLU(name=f"{name}.relu")(x)
        x = keras.layers.Concatenate(name=f"{name}.concat")([x, skips[level]])
    logits = keras.layers.Conv2DTranspose(num_classes, 3, strides=2, padding="same", kernel_initializer="he_normal",
                                          dtype="float32", name="logits")(x)
    return SegmentationModel(inputs, logits, name="unet_compact", size_divisor=2**levels, output_stride=2**levels,
                             cam_layer=f"encoder.level{levels - 1}.leaky_relu")
