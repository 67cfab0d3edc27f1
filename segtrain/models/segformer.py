"""SegFormer (Xie et al., 2021): the Mix Transformer encoder (MiT-B0...B5) and the all-MLP decoder.

The encoder has four stages, at strides 4, 8, 16 and 32. Each starts with an overlapping patch
embedding (a strided convolution: 7x7 stride 4, then 3x3 stride 2) and a layer norm, and
stacks transformer blocks: efficient self-attention, whose keys and values come from the
feature map shrunk by a strided convolution (the reduction ratio: 8, 4, 2, 1 per stage), and a
Mix-FFN (a linear layer, a 3x3 depthwise convolution, GELU, a linear layer), each with a
residual connection after a layer norm, and stochastic depth. There are no position
embeddings: the depthwise convolution gives the position, so any input size works.

The decoder projects each stage to ``decoder_dim`` channels with a linear layer, resizes them to
stride 4, concatenates them, fuses them with a 1x1 convolution, batch norm and ReLU, and
classifies; the logits are resized bilinearly to the input.

Feature maps stay [B, H, W, C] throughout (a linear layer acts on the last axis), so the encoder
is an ordinary functional Keras model, registered as the backbones ``mit_b0`` ... ``mit_b5``:
DeepLab, FCN and U-Net take it too, and the SegFormer decoder takes any backbone.
"""

from __future__ import annotations

import keras
from keras import ops

from registry import BACKBONES, MODELS
from segtrain.models import backbones
from segtrain.models.layers import classifier, image_input, upsample_like
from segtrain.models.model import SegmentationModel

# (channels per stage, blocks per stage); every MiT has 1, 2, 5, 8 heads, reduction ratios 8, 4, 2,
# 1 and an MLP ratio of 4.
MIT = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
HEADS, REDUCTION, MLP_RATIO = (1, 2, 5, 8), (8, 4, 2, 1), 4
DECODER_DIM = {"b0": 256, "b1": 256}  # 768 for the others (the paper's Table 1)


def _dense_init():
    return keras.initializers.TruncatedNormal(stddev=0.02)


@keras.saving.register_keras_serializable(package="segtrain")
class EfficientAttention(keras.layers.Layer):
    """Multi-head self-attention over the pixels of a [B, H, W, C] map, with keys and values from
    the map shrunk ``reduction`` times by a strided convolution (and a layer norm)."""

    def __init__(self, dim: int, heads: int, reduction: int, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.reduction = dim, heads, reduction
        self.query = keras.layers.Dense(dim, kernel_initializer=_dense_init(), name="query")
        self.key_value = keras.layers.Dense(2 * dim, kernel_initializer=_dense_init(), name="key_value")
        self.projection = keras.layers.Dense(dim, kernel_initializer=_dense_init(), name="projection")
        if reduction > 1:
            self.shrink = keras.layers.Conv2D(dim, reduction, strides=reduction, name="shrink")
            self.shrink_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="shrink_norm")

    def build(self, input_shape):
        self.query.build(input_shape)
        reduced = input_shape
        if self.reduction > 1:
            self.shrink.build(input_shape)
            reduced = self.shrink.compute_output_shape(input_shape)
            self.shrink_norm.build(reduced)
        self.key_value.build(reduced)
        self.projection.build(input_shape)

    def call(self, x):
        shape = ops.shape(x)
        batch, height, width = shape[0], shape[1], shape[2]
        head_dim = self.dim // self.heads

        def split_heads(t):  # [B, h, w, C] -> [B, heads, h*w, C/heads]
            if self.heads == 1:
                # A reshape, not a transpose that moves a size-1 axis: tf2onnx rewrites such a
                # transpose into a reshape that loses the batch (ONNX Runtime fails at batch > 1).
                return ops.reshape(t, (batch, 1, -1, head_dim))
            t = ops.reshape(t, (batch, -1, self.heads, head_dim))
            return ops.transpose(t, (0, 2, 1, 3))

        q = split_heads(self.query(x))
        reduced = self.shrink_norm(self.shrink(x)) if self.reduction > 1 else x
        k, v = ops.split(self.key_value(reduced), 2, axis=-1)
        k, v = split_heads(k), split_heads(v)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / ops.cast(head_dim ** 0.5, q.dtype)
        attended = ops.matmul(ops.softmax(scores, axis=-1), v)  # [B, heads, h*w, C/heads]
        if self.heads > 1:
            attended = ops.transpose(attended, (0, 2, 1, 3))
        attended = ops.reshape(attended, (batch, height, width, self.dim))
        return self.projection(attended)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "heads": self.heads, "reduction": self.reduction}


@keras.saving.register_keras_serializable(package="segtrain")
class DropPath(keras.layers.Layer):
    """Stochastic depth: in training, drops a residual branch for a whole example with
    probability ``rate`` (and scales the kept ones by 1 / (1 - rate))."""

    def __init__(self, rate: float, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.seed = keras.random.SeedGenerator(0)

    def call(self, x, training=None):
        if not training or not self.rate:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = ops.floor(keep + keras.random.uniform(shape, seed=self.seed, dtype=x.dtype))
        return x / keep * mask

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


def _block(x, dim: int, heads: int, reduction: int, drop: float, name: str):
    """One transformer block: x + attention(norm(x)), then x + Mix-FFN(norm(x))."""
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}.norm1")(x)
    y = EfficientAttention(dim, heads, reduction, name=f"{name}.attention")(y)
    x = keras.layers.Add(name=f"{name}.add1")([x, DropPath(drop, name=f"{name}.drop1")(y)])
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}.norm2")(x)
    y = keras.layers.Dense(dim * MLP_RATIO, kernel_initializer=_dense_init(), name=f"{name}.ffn.fc1")(y)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name=f"{name}.ffn.dwconv")(y)
    y = keras.layers.Activation("gelu", name=f"{name}.ffn.gelu")(y)
    y = keras.layers.Dense(dim, kernel_initializer=_dense_init(), name=f"{name}.ffn.fc2")(y)
    return keras.layers.Add(name=f"{name}.add2")([x, DropPath(drop, name=f"{name}.drop2")(y)])


def mix_transformer(input_shape, dims, depths, drop_path_rate: float = 0.1, name: str = "mit") -> keras.Model:
    """The MiT encoder as a functional model from images to its stride-32 map (the stages' ends
    are its layers ``{name}.stage{i}.norm``)."""
    inputs = keras.Input(input_shape)
    x = inputs
    rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
    block = 0
    for stage, (dim, depth) in enumerate(zip(dims, depths), start=1):
        kernel, stride = (7, 4) if stage == 1 else (3, 2)
        x = keras.layers.Conv2D(dim, kernel, strides=stride, padding="same", name=f"{name}.stage{stage}.patch_embed")(x)
        x = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{name}.stage{stage}.patch_norm")(x)
        for i in range(depth):
            x = _block(x, dim, HEADS[stage - 1], REDUCTION[stage - 1], rates[block], f"{name}.stage{stage}.block{i}")
            block += 1
        x = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}.stage{stage}.norm")(x)
    return keras.Model(inputs, x, name=name)


def _register_mit(size: str):
    dims, depths = MIT[size]
    name = f"mit_{size}"

    def factory(weights: str | None = None, freeze: bool = False, freeze_batch_norm: bool = False,
                drop_path_rate: float = 0.1) -> backbones.Backbone:
        return backbones.Backbone(name, lambda shape: mix_transformer(shape, dims, depths, drop_path_rate, name),
                                  None, "torch", weights, freeze, freeze_batch_norm, source)

    source = f"Xie et al. 2021 (SegFormer), Mix Transformer {size.upper()}, arXiv:2105.15203"
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"""Xie et al. 2021 (SegFormer), Mix Transformer {size.upper()}: channels {dims}, blocks {depths}.

    Source: {source}.

    Args:
      weights: None (random), or a local .weights.h5 file saved from this network.
      freeze: do not train the backbone.
      freeze_batch_norm: no effect (the MiT normalises with layer norm).
      drop_path_rate: stochastic depth of the last block (linearly from 0 at the first).
    """
    BACKBONES.register(name)(factory)


for _size in MIT:
    _register_mit(_size)


@MODELS.register("segformer")
def segformer(
    num_classes: int,
    backbone: str = "mit_b0",
    decoder_dim: int | None = None,
    dropout: float = 0.1,
    input_shape=None,
) -> keras.Model:
    """SegFormer: a Mix Transformer encoder and the all-MLP decoder (stride 4, resized to the input).

    Source: Xie et al. 2021, arXiv:2105.15203.

    Args:
      num_classes: output channels (logits).
      backbone: 'mit_b0' ... 'mit_b5', or any registered backbone with stages at strides 4-32
        ('convnext_tiny', ...); its settings are under backbones.<name>.*.
      decoder_dim: channels of the decoder's projections and fusion; None: the paper's (256 for
        MiT-B0/B1, 768 for the others).
      dropout: before the classifier.
      input_shape: (H, W, 3) to fix the input size, or None for any size.
    """
    encoder = backbones.get(backbone, owner="segformer")
    if decoder_dim is None:
        decoder_dim = DECODER_DIM.get(backbone.removeprefix("mit_"), 768)
    inputs = image_input(input_shape)
    features = encoder.pyramid(inputs, (4, 8, 16, 32))
    projected = []
    for stride, feature in zip((4, 8, 16, 32), features):
        x = keras.layers.Dense(decoder_dim, kernel_initializer=_dense_init(), name=f"decoder.linear{stride}")(feature)
        if stride > 4:
            x = upsample_like(x, features[0], f"decoder.resize{stride}")
        projected.append(x)
    x = keras.layers.Concatenate(name="decoder.concat")(projected[::-1])
    x = keras.layers.Conv2D(decoder_dim, 1, use_bias=False, name="decoder.fuse")(x)
    x = keras.layers.BatchNormalization(name="decoder.fuse.bn")(x)
    x = keras.layers.ReLU(name="decoder.fuse.relu")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="decoder.dropout")(x)
    logits = classifier(x, num_classes)
    return SegmentationModel(inputs, upsample_like(logits, inputs, "upsample"), name="segformer", output_stride=32,
                             preprocessing=encoder.input_preprocessing, cam_layer="backbone:3")
