"""Backbones: registered encoders that models take by name (``models.deeplabv3.backbone = 'resnet50'``).

A backbone is registered in ``registry.BACKBONES``; its factory takes the backbone's own
settings, bound in gin under ``backbones.<name>.*``::

    backbones.resnet50.weights = '/data/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'
    backbones.resnet50.freeze_batch_norm = True

and returns a ``Backbone``. A model asks the Backbone for the feature maps it needs (its
``pyramid``: stride -> feature map), and for the output stride it runs at (DeepLab dilates the
last stages; FCN and U-Net keep the network's own strides):

    features = BACKBONES.get('resnet50')().pyramid(images, strides=(4, 32), output_stride=16)

The built-in backbones are keras.applications networks built with ``weights=None``: nothing is
ever downloaded; a local weights file loads with ``weights``. With weights, the Backbone also
says which input preprocessing they expect (keras.applications' ``'caffe'`` mode for ResNet and
VGG: BGR channel order, ImageNet mean subtracted), and the model passes that on to the input
pipeline.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Callable, Sequence

import keras

from registry import BACKBONES, RegistryError
from segtrain.errors import SegtrainError
from segtrain.models.model import leaf_layers


@dataclasses.dataclass(frozen=True)
class Backbone:
    """An encoder network, its stages and its settings.

    Attributes:
      name: the registry name (for messages).
      build: ``build(input_shape) -> keras.Model`` with random weights.
      stages: None (the usual): the stages are measured, the feature map at stride ``s`` is the
        output of the last layer whose output is 1/s of the input. Or stride -> regular
        expression of the layer names that make up the stage ending at that stride; its
        feature map is the output of the last matching layer.
      preprocessing: the input preprocessing that ``weights`` expect (a keras.applications mode:
        'caffe', 'tf' or 'torch'), or None.
      weights: None (random initialisation), ``'imagenet'`` (keras.applications' ImageNet
        weights from the Keras cache, fetched if missing: segtrain.models.pretrained), or the
        path of a local weights file saved from the same network (``.h5`` as Keras distributes
        them, or ``.weights.h5``).
      freeze: the whole backbone is not trained (its batch norm uses moving statistics).
      freeze_batch_norm: only the backbone's batch norm layers are frozen.
      source: where the architecture comes from (for docs).
      batch_norm_momentum: None (the network's own), or the momentum of the moving statistics of
        every batch norm layer of the backbone. keras.applications' MobileNetV3 keeps 0.999 (an
        average over about 1000 steps): a run of a few hundred steps evaluates with statistics
        still close to their initial values; 0.9 or 0.99 suits short fine-tuning.
    """

    name: str
    build: Callable[[tuple], keras.Model]
    stages: dict[int, str] | None = None
    preprocessing: str | None = None
    weights: str | None = None
    freeze: bool = False
    freeze_batch_norm: bool = False
    source: str = ""
    batch_norm_momentum: float | None = None

    @property
    def input_preprocessing(self) -> str | None:
        """The preprocessing the pipeline must apply: the weights' own, none for random weights."""
        return self.preprocessing if self.weights else None

    def strides(self) -> list[int]:
        """The strides the backbone has feature maps at (builds it once per architecture)."""
        if self.stages is not None:
            return sorted(self.stages)
        return _stages(self.build((None, None, 3)), self.build).strides

    def network(
        self,
        strides: Sequence[int],
        *,
        input_shape=None,
        output_stride: int | None = None,
        multi_grid: Sequence[int] | None = None,
    ) -> keras.Model:
        """The backbone as a model from images to its feature maps at ``strides``, in that order.

        Args:
          strides: the strides of the feature maps to return; each is the output of the stage
            that ends at that stride (e.g. 4 -> ``conv2_block3_out`` of a ResNet-50).
          input_shape: (H, W, 3) or None for any size.
          output_stride: None for the network's own; else the stages past it run at this
            stride: their strided layers take stride 1 and the layers after them dilate
            (rate 2, then 4).
          multi_grid: rates per block of the last dilated stage, multiplied by its rate
            (DeepLab v3's (1, 2, 4)).

        Raises:
          SegtrainError: a stride the backbone has no stage at, an impossible output stride, or a
            missing or unsuitable weights file.
        """
        shape = tuple(input_shape) if input_shape else (None, None, 3)
        dilate = output_stride is not None
        # Nested blocks (ConvNeXt's downsampling) keep the input shape they were built with when
        # cloned: a network to dilate is built for any size, and given ``shape`` by the clone.
        model = self.build((None, None, shape[-1]) if dilate else shape)
        measured = _stages(model, self.build)
        available = sorted(self.stages) if self.stages is not None else measured.strides
        for stride in strides:
            if stride not in available:
                raise SegtrainError(
                    f"Backbone {self.name!r} has no stage at stride {stride}; it has {available}.")
        if self.weights:
            from segtrain.models import pretrained

            _load_weights(model, pretrained.resolve(self.name, self.weights), self.name, self.weights)
        if self.stages is not None:
            taps = [_stage_output(model, self.stages[s], self.name) for s in strides]
        else:
            taps = [measured.tap(model, s) for s in strides]
        if dilate and output_stride != max(available):
            model = _dilate(model, measured, self.name, available, output_stride, multi_grid, shape)
        features = keras.Model(model.input, [model.get_layer(t).output for t in taps], name="backbone")
        # The stride of each layer's stage, for layer-wise learning rates (segtrain.train.optimizers);
        # a layer between stages (padding, squeeze-excitation on a 1x1 map) counts with the one before.
        stride, layer_strides = min(available), []
        for layer, measured_stride in zip(leaf_layers(model), measured.leaf):
            stride = measured_stride or stride
            layer_strides.append((layer.name, stride))
        features.layer_strides = tuple(layer_strides)
        norms = [layer for layer in leaf_layers(features) if isinstance(layer, keras.layers.BatchNormalization)]
        if self.batch_norm_momentum is not None:
            if not 0 <= self.batch_norm_momentum < 1:
                raise SegtrainError(f"backbones.{self.name}.batch_norm_momentum={self.batch_norm_momentum!r}: "
                                    f"give a number in [0, 1).")
            for layer in norms:
                layer.momentum = float(self.batch_norm_momentum)
        if self.freeze:
            features.trainable = False
        elif self.freeze_batch_norm:
            for layer in norms:
                layer.trainable = False
        return features

    def pyramid(self, inputs, strides: Sequence[int], **kwargs) -> list:
        """The feature maps of ``inputs`` (a keras.Input) at ``strides``, as a list.

        Keyword arguments are those of ``network``; the input shape is the input's.
        """
        outputs = self.network(strides, input_shape=inputs.shape[1:], **kwargs)(inputs)
        return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def get(name: str, owner: str) -> Backbone:
    """The registered backbone ``name`` with its gin settings; ``owner`` names the model asking.

    Raises:
      SegtrainError: an unknown name (with the close matches), naming the model's binding.
    """
    try:
        factory = BACKBONES.get(name)
    except RegistryError as e:
        raise SegtrainError(f"models.{owner}.backbone: {e}") from None
    backbone = factory()
    if not isinstance(backbone, Backbone):
        raise SegtrainError(f"Backbone plugin {name!r} returned {type(backbone).__name__}, not a "
                            f"segtrain.models.backbones.Backbone.")
    return backbone


def resnet_stages(last_stage: int = 5) -> dict[int, str]:
    """The stages of keras.applications' ResNets, by the names of their layers."""
    stages = {2: r"conv1_.*", 4: r"(pool1_.*|conv2_.*)"}
    for k in range(3, last_stage + 1):
        stages[2 ** k] = rf"conv{k}_.*"
    return stages


VGG_STAGES = {2 ** k: rf"block{k}_.*" for k in range(1, 6)}


# ---- the built-in backbones: keras.applications networks ------------------------------------

def _keras_application(name: str, network: Callable[..., keras.Model], preprocessing: str, source: str,
                       stages: dict[int, str] | None = None, **options) -> Callable[..., Backbone]:
    """Registers a keras.applications network (``include_top=False``, random weights) as a backbone.

    ``options`` go to the network's constructor (``include_preprocessing=False``: the input
    pipeline normalises, as for every backbone).
    """

    def build(shape):
        return network(include_top=False, weights=None, input_shape=shape, **options)

    def factory(weights: str | None = None, freeze: bool = False, freeze_batch_norm: bool = False,
                batch_norm_momentum: float | None = None) -> Backbone:
        return Backbone(name, build, stages, preprocessing, weights, freeze, freeze_batch_norm, source,
                        batch_norm_momentum)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"""{source}.

    Source: {source}.

    Args:
      weights: None (random), 'imagenet' (keras.applications' ImageNet weights, fetched into the
        Keras cache on request: `segtrain weights fetch {name}`), or a local {name} weights file
        (include_top=False). With weights the input is preprocessed as they expect ('{preprocessing}').
      freeze: do not train the backbone.
      freeze_batch_norm: keep the backbone's batch norm statistics and scales as loaded.
      batch_norm_momentum: None (the network's own), or the momentum of every batch norm's
        moving statistics (0.9 or 0.99 for runs of a few thousand steps).
    """
    return BACKBONES.register(name)(factory)


_A = keras.applications
_NO_PREPROCESSING = {"include_preprocessing": False}
_keras_application("resnet50", _A.ResNet50, "caffe", "He et al. 2016, keras.applications.ResNet50", resnet_stages())
_keras_application("resnet101", _A.ResNet101, "caffe", "He et al. 2016, keras.applications.ResNet101", resnet_stages())
_keras_application("vgg16", _A.VGG16, "caffe", "Simonyan & Zisserman 2015, keras.applications.VGG16", VGG_STAGES)
for _size in ("tiny", "small", "base"):
    _keras_application(f"convnext_{_size}", getattr(_A, f"ConvNeXt{_size.title()}"), "torch",
                       f"Liu et al. 2022, keras.applications.ConvNeXt{_size.title()}", **_NO_PREPROCESSING)
for _size in ("b0", "b1", "b2", "b3", "s"):
    # keras.applications normalises B0-B3 inputs with ImageNet's mean and std, S's to [-1, 1].
    _keras_application(f"efficientnetv2_{_size}", getattr(_A, f"EfficientNetV2{_size.upper()}"),
                       "torch" if _size.startswith("b") else "tf",
                       f"Tan & Le 2021, keras.applications.EfficientNetV2{_size.upper()}", **_NO_PREPROCESSING)
for _size in ("small", "large"):
    _keras_application(f"mobilenetv3_{_size}", getattr(_A, f"MobileNetV3{_size.title()}"), "tf",
                       f"Howard et al. 2019, keras.applications.MobileNetV3{_size.title()}", **_NO_PREPROCESSING)
for _depth in (50, 101):
    _keras_application(f"resnet{_depth}_v2", getattr(_A, f"ResNet{_depth}V2"), "tf",
                       f"He et al. 2016 (pre-activation), keras.applications.ResNet{_depth}V2")


# ---- stages, measured -----------------------------------------------------------------------

# The input sides the stages are measured at (2x2 and 3x3 maps at stride 32): a layer is at stride
# s when its output is 1/s of the input at both; padding layers and 1x1 maps are at none.
PROBE_SIZES = (64, 96)


@dataclasses.dataclass(frozen=True)
class _Measured:
    """The stride of each layer's output, measured on inputs of PROBE_SIZES; None where it is not
    1/s of the input (padding layers, 1x1 squeeze-excitation maps)."""

    top: tuple  # per layer of model.layers
    leaf: tuple  # per layer of leaf_layers(model)

    @property
    def strides(self) -> list[int]:
        return sorted({s for s in self.top if s and s > 1})

    def tap(self, model: keras.Model, stride: int) -> str:
        """The name of the last layer (of ``model.layers``) whose output is at ``stride``."""
        return [layer.name for layer, s in zip(model.layers, self.top) if s == stride][-1]


_MEASURED: dict[tuple, _Measured] = {}


def _signature(model: keras.Model) -> tuple:
    """What a layer's output stride depends on, for every layer (not names: some are numbered
    per process, like MobileNetV3's activations)."""
    return tuple((type(layer).__name__, getattr(layer, "strides", None),
                  getattr(layer, "kernel_size", getattr(layer, "pool_size", None)))
                 for layer in [*model.layers, None, *leaf_layers(model)] if layer is not None)


def _output_side(layer) -> int | None:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):  # a shared layer has several outputs
        return None
    return shape[1] if len(shape) == 4 else None


def _strides(probes: list[list]) -> tuple:
    """Per layer, the stride at which its output is at every probe size, else None."""
    found = []
    for layers in zip(*probes):
        sides = [_output_side(layer) for layer in layers]
        strides = {size // side if side and size % side == 0 else None for size, side in zip(PROBE_SIZES, sides)}
        stride = strides.pop() if len(strides) == 1 else None
        found.append(stride if stride and stride & (stride - 1) == 0 else None)
    return tuple(found)


def _stages(model: keras.Model, build) -> _Measured:
    """The measured stages of ``model`` (built by ``build``): probe builds at PROBE_SIZES, once per
    architecture."""
    key = _signature(model)
    if key not in _MEASURED:
        probes = [build((size, size, 3)) for size in PROBE_SIZES]
        if any(_signature(probe) != key for probe in probes):
            raise SegtrainError(f"Backbone network {model.name!r} has different layers at input sizes "
                                f"{PROBE_SIZES}: its stages cannot be measured; give them as Backbone.stages.")
        _MEASURED[key] = _Measured(_strides([probe.layers for probe in probes]),
                                   _strides([leaf_layers(probe) for probe in probes]))
    return _MEASURED[key]


def _stage_output(model: keras.Model, pattern: str, name: str) -> str:
    names = [layer.name for layer in model.layers if re.fullmatch(pattern, layer.name)]
    if not names:
        raise SegtrainError(f"Backbone {name!r} has no layer matching {pattern!r}.")
    return names[-1]


def _load_weights(model: keras.Model, path: str, name: str, setting: str | None = None) -> None:
    where = f"backbones.{name}.weights={setting or path!r}"
    if setting == "imagenet":
        where = f"backbones.{name}.weights='imagenet' ({path})"
    if not os.path.isfile(path):
        raise SegtrainError(f"{where}: no such file. Give a local {name} weights file (include_top=False), "
                            f"or 'imagenet' for keras.applications' ImageNet weights.")
    if not path.endswith(".h5"):
        raise SegtrainError(f"{where}: expected a Keras weights file ending in .h5 or .weights.h5.")
    try:
        # Keras only warns when parts of the file do not match, and keeps random weights there.
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            model.load_weights(path)
    except Exception as e:  # ValueError, KeyError, OSError, a warning... depending on the mismatch
        detail = " ".join(str(e).split())[:300]
        raise SegtrainError(
            f"{where}: cannot be loaded into the {name} backbone (include_top=False): "
            f"{type(e).__name__}: {detail}"
        ) from None


# ---- output stride: strided layers to stride 1, the layers after them dilated ---------------

_BLOCK = re.compile(r"(?:block_?|expanded_conv_)(\d+[a-z]?)")


def _dilate(model: keras.Model, measured: _Measured, name: str, available: Sequence[int], output_stride: int,
            multi_grid, input_shape: tuple) -> keras.Model:
    """Rebuilds ``model`` with the stages past ``output_stride`` at stride 1 and dilated.

    In each such stage the strided layers (convolutions, depthwise convolutions, pooling) take
    stride 1, keeping the dilation of the stage before; every later kernel larger than 1x1
    dilates by the stage's rate (2, then 4), times ``multi_grid`` per block in the last stage.
    Explicit zero padding before a changed convolution goes (it pads 'same' now). The weights
    carry over: strides and dilation rates do not change any kernel's shape.
    """
    allowed = [s for s in available if s >= 4]
    if output_stride not in allowed:
        raise SegtrainError(f"Output stride {output_stride}: backbone {name} supports {allowed}.")
    dilated = [s for s in available if s > output_stride]
    rates = {s: 2 ** (i + 1) for i, s in enumerate(dilated)}
    before = {s: rates.get(s // 2, 1) for s in dilated}
    leaves = leaf_layers(model)
    stage = {id(layer): s for layer, s in zip(leaves, measured.leaf) if s in rates}

    def strided(layer):
        return max(getattr(layer, "strides", None) or (1,)) > 1

    def kernel(layer):
        return max(getattr(layer, "kernel_size", None) or (1,))

    convolutions = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    pooling = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
    changed = {id(layer) for layer in leaves if id(layer) in stage and isinstance(layer, convolutions)
               and (strided(layer) or kernel(layer) > 1)}
    pads = {id(layer) for layer in leaves if isinstance(layer, keras.layers.ZeroPadding2D)
            and (consumers := [node.operation for node in layer._outbound_nodes])
            and all(id(c) in changed for c in consumers)}
    grid = {}
    if multi_grid:
        last = [layer for layer in leaves if stage.get(id(layer)) == dilated[-1] and id(layer) in changed
                and not strided(layer)]
        blocks = []
        for layer in last:
            match = _BLOCK.search(layer.name)
            if not match:
                raise SegtrainError(f"multi_grid: backbone {name}'s layer {layer.name} belongs to no numbered block.")
            if match.group(1) not in blocks:
                blocks.append(match.group(1))
            grid[id(layer)] = multi_grid[min(blocks.index(match.group(1)), len(multi_grid) - 1)]

    def clone(layer):
        config = layer.get_config()
        if id(layer) in pads:
            config["padding"] = ((0, 0), (0, 0))
        elif id(layer) in changed:
            s = stage[id(layer)]
            rate = before[s] if strided(layer) else rates[s] * grid.get(id(layer), 1)
            config.update(strides=(1, 1), dilation_rate=(rate, rate), padding="same")
        elif id(layer) in stage and isinstance(layer, pooling) and strided(layer):
            config.update(strides=(1, 1), padding="same")
        return layer.__class__.from_config(config)

    new = keras.models.clone_model(model, input_tensors=keras.Input(input_shape), clone_function=clone, recursive=True)
    new.set_weights(model.get_weights())
    return new
