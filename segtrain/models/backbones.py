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


@dataclasses.dataclass(frozen=True)
class Backbone:
    """An encoder network, its stages and its settings.

    Attributes:
      name: the registry name (for messages).
      build: ``build(input_shape) -> keras.Model`` with random weights.
      stages: stride -> regular expression of the layer names that make up the stage ending at
        that stride; its feature map is the output of the last matching layer.
      preprocessing: the input preprocessing that ``weights`` expect (a keras.applications mode:
        'caffe', 'tf' or 'torch'), or None.
      weights: None (random initialisation) or the path of a local weights file saved from the
        same network (``.h5`` as Keras distributes them, or ``.weights.h5``).
      freeze: the whole backbone is not trained (its batch norm uses moving statistics).
      freeze_batch_norm: only the backbone's batch norm layers are frozen.
      source: where the architecture comes from (for docs).
    """

    name: str
    build: Callable[[tuple], keras.Model]
    stages: dict[int, str]
    preprocessing: str | None = None
    weights: str | None = None
    freeze: bool = False
    freeze_batch_norm: bool = False
    source: str = ""

    @property
    def input_preprocessing(self) -> str | None:
        """The preprocessing the pipeline must apply: the weights' own, none for random weights."""
        return self.preprocessing if self.weights else None

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
            stride with dilated 3x3 convolutions instead (rate 2, then 4).
          multi_grid: rates per block of the last dilated stage, multiplied by its rate
            (DeepLab v3's (1, 2, 4)).

        Raises:
          SegtrainError: a stride the backbone has no stage at, an impossible output stride, or a
            missing or unsuitable weights file.
        """
        shape = tuple(input_shape) if input_shape else (None, None, 3)
        for stride in strides:
            if stride not in self.stages:
                raise SegtrainError(
                    f"Backbone {self.name!r} has no stage at stride {stride}; it has {sorted(self.stages)}.")
        model = self.build(shape)
        if self.weights:
            _load_weights(model, self.weights, self.name)
        if output_stride is not None and output_stride != max(self.stages):
            model = _dilate(model, self, output_stride, multi_grid)
        outputs = [model.get_layer(_stage_output(model, self.stages[s], self.name)).output for s in strides]
        features = keras.Model(model.inputs, outputs, name="backbone")
        if self.freeze:
            features.trainable = False
        elif self.freeze_batch_norm:
            for layer in features.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
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


def _keras_application(name: str, network: Callable[..., keras.Model], stages: dict[int, str],
                       source: str) -> Callable[..., Backbone]:
    """Registers a keras.applications network (``include_top=False``, no download) as a backbone."""

    def factory(weights: str | None = None, freeze: bool = False, freeze_batch_norm: bool = False) -> Backbone:
        return Backbone(name, lambda shape: network(include_top=False, weights=None, input_shape=shape),
                        stages, "caffe", weights, freeze, freeze_batch_norm, source)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"""{source}; 'caffe' preprocessing with weights.

    Source: {source}.

    Args:
      weights: None (random), or a local keras.applications {name} weights file (include_top=False).
      freeze: do not train the backbone.
      freeze_batch_norm: keep the backbone's batch norm statistics and scales as loaded.
    """
    return BACKBONES.register(name)(factory)


_keras_application("resnet50", keras.applications.ResNet50, resnet_stages(), "He et al. 2016, keras.applications.ResNet50")
_keras_application("resnet101", keras.applications.ResNet101, resnet_stages(), "He et al. 2016, keras.applications.ResNet101")
_keras_application("vgg16", keras.applications.VGG16, VGG_STAGES, "Simonyan & Zisserman 2015, keras.applications.VGG16")


def _stage_output(model: keras.Model, pattern: str, name: str) -> str:
    names = [layer.name for layer in model.layers if re.fullmatch(pattern, layer.name)]
    if not names:
        raise SegtrainError(f"Backbone {name!r} has no layer matching {pattern!r}.")
    return names[-1]


def _load_weights(model: keras.Model, path: str, name: str) -> None:
    where = f"backbones.{name}.weights={path!r}"
    if not os.path.isfile(path):
        raise SegtrainError(f"{where}: no such file. segtrain downloads nothing; point it at a local "
                            f"{name} weights file (include_top=False).")
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


def _dilate(model: keras.Model, backbone: Backbone, output_stride: int, multi_grid) -> keras.Model:
    """Rebuilds ``model`` with the stages past ``output_stride`` at stride 1 and dilated.

    The weights carry over: strides and dilation rates do not change any kernel's shape.
    """
    stages, name = backbone.stages, backbone.name
    allowed = [s for s in sorted(stages) if s >= 4]
    if output_stride not in allowed:
        raise SegtrainError(f"Output stride {output_stride}: backbone {name} supports {allowed}.")
    dilated = [s for s in sorted(stages) if s > output_stride]
    rates = {s: 2 ** (i + 1) for i, s in enumerate(dilated)}
    last = dilated[-1]

    def stage_of(layer_name):
        for s in dilated:
            if re.fullmatch(stages[s], layer_name):
                return s
        return None

    def clone(layer):
        config = layer.get_config()
        stage = stage_of(layer.name)
        if stage is None:
            return layer.__class__.from_config(config)
        if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)) and max(layer.strides) > 1:
            raise SegtrainError(f"Backbone {name!r} downsamples with pooling in {layer.name}; it cannot be dilated.")
        if isinstance(layer, keras.layers.Conv2D):
            if max(config["strides"]) > 1:
                config["strides"] = (1, 1)
            if max(config["kernel_size"]) > 1:
                rate = rates[stage]
                block = re.search(r"block(\d+)", layer.name)
                if multi_grid and stage == last and block:
                    rate *= multi_grid[min(int(block.group(1)), len(multi_grid)) - 1]
                config["dilation_rate"] = (rate, rate)
                config["padding"] = "same"
        return layer.__class__.from_config(config)

    new = keras.models.clone_model(model, clone_function=clone)
    new.set_weights(model.get_weights())
    return new
