"""Encoders from keras.applications, as feature extractors for the segmentation heads.

A backbone is a keras.applications network without its top (``weights=None``: nothing is ever
downloaded), optionally loaded from a local weights file, optionally dilated so that its last
stages keep a higher resolution (DeepLab's output stride), and cut into a model whose outputs
are the feature maps at the strides a head asks for.

    features = backbone("resnet50", strides=(4, 16), output_stride=16)(images)

``register_backbone`` adds another one (any functional model whose stages end in named layers).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Callable, Sequence

import keras

from segtrain.errors import SegtrainError


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and where its stages are.

    Attributes:
      build: ``build(input_shape) -> keras.Model`` with random weights.
      stages: stride -> regular expression of the layer names that make up the stage ending at
        that stride; its feature map is the output of the last matching layer.
      source: where the architecture comes from (for docs).
    """

    build: Callable[[tuple], keras.Model]
    stages: dict[int, str]
    source: str = ""


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, spec: BackboneSpec, override: bool = False) -> None:
    """Makes ``backbone=name`` available to every model with a backbone argument."""
    if name in BACKBONES and not override:
        raise SegtrainError(f"Backbone {name!r} is already registered; pass override=True to replace it.")
    BACKBONES[name] = spec


def _resnet_stages(last_stage: int = 5) -> dict[int, str]:
    stages = {2: r"conv1_.*", 4: r"(pool1_.*|conv2_.*)"}
    for k in range(3, last_stage + 1):
        stages[2 ** k] = rf"conv{k}_.*"
    return stages


def _applications(fn: Callable[..., keras.Model]) -> Callable[[tuple], keras.Model]:
    def build(input_shape):
        return fn(include_top=False, weights=None, input_shape=input_shape)

    return build


register_backbone("resnet50", BackboneSpec(
    _applications(keras.applications.ResNet50), _resnet_stages(),
    "He et al. 2016, keras.applications.ResNet50"))
register_backbone("resnet101", BackboneSpec(
    _applications(keras.applications.ResNet101), _resnet_stages(),
    "He et al. 2016, keras.applications.ResNet101"))
register_backbone("vgg16", BackboneSpec(
    _applications(keras.applications.VGG16), {2 ** k: rf"block{k}_.*" for k in range(1, 6)},
    "Simonyan & Zisserman 2015, keras.applications.VGG16"))


def backbone(
    name: str,
    strides: Sequence[int],
    *,
    input_shape=None,
    weights: str | None = None,
    output_stride: int | None = None,
    multi_grid: Sequence[int] | None = None,
    freeze: bool = False,
    freeze_batch_norm: bool = False,
    owner: str = "model",
) -> keras.Model:
    """Builds the named backbone as a model mapping images to feature maps at ``strides``.

    Args:
      name: a registered backbone ('resnet50', 'resnet101', 'vgg16').
      strides: the strides of the feature maps to return, in this order; each is the output of
        the stage that ends at that stride (e.g. 4 -> ``conv2_block3_out`` of a ResNet-50).
      input_shape: (H, W, 3) or None for any size.
      weights: None (random initialisation) or the path of a local weights file saved from
        the same keras.applications network (``.h5`` as Keras distributes them, or
        ``.weights.h5``).
      output_stride: None for the network's own; else the stages past it run at this
        stride with dilated 3x3 convolutions instead (rate 2, then 4).
      multi_grid: rates per block of the last dilated stage, multiplied by its rate
        (DeepLab v3's (1, 2, 4)).
      freeze: the whole backbone is not trained (and its batch norm uses moving statistics).
      freeze_batch_norm: only the backbone's batch norm layers are frozen.
      owner: the gin name of the model using it, for error messages ('deeplabv3').

    Raises:
      SegtrainError: unknown backbone, missing or unsuitable weights file, impossible stride.
    """
    if name not in BACKBONES:
        raise SegtrainError(
            f"models.{owner}.backbone={name!r} is not a known backbone; known: "
            f"{', '.join(sorted(BACKBONES))} (add one with segtrain.models.backbones.register_backbone)."
        )
    spec = BACKBONES[name]
    shape = tuple(input_shape) if input_shape else (None, None, 3)
    for stride in strides:
        if stride not in spec.stages:
            raise SegtrainError(f"Backbone {name!r} has no stage at stride {stride}; it has {sorted(spec.stages)}.")
    model = spec.build(shape)
    if weights:
        _load_weights(model, weights, name, owner)
    if output_stride is not None and output_stride != max(spec.stages):
        model = _dilate(model, spec, name, output_stride, multi_grid, owner)
    outputs = [model.get_layer(_stage_output(model, spec.stages[s], name)).output for s in strides]
    features = keras.Model(model.inputs, outputs, name="backbone")
    if freeze:
        features.trainable = False
    elif freeze_batch_norm:
        for layer in features.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return features


def features(inputs, name: str, strides: Sequence[int], **kwargs) -> list:
    """The backbone's feature maps of ``inputs`` (a keras.Input) at ``strides``, as a list.

    Keyword arguments are those of ``backbone``; the input shape is the input's.
    """
    outputs = backbone(name, strides, input_shape=inputs.shape[1:], **kwargs)(inputs)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _stage_output(model: keras.Model, pattern: str, name: str) -> str:
    names = [layer.name for layer in model.layers if re.fullmatch(pattern, layer.name)]
    if not names:
        raise SegtrainError(f"Backbone {name!r} has no layer matching {pattern!r}.")
    return names[-1]


def _load_weights(model: keras.Model, path: str, name: str, owner: str) -> None:
    where = f"models.{owner}.backbone_weights={path!r}"
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


def _dilate(model, spec: BackboneSpec, name: str, output_stride: int, multi_grid, owner: str):
    """Rebuilds ``model`` with the stages past ``output_stride`` at stride 1 and dilated.

    The weights carry over: strides and dilation rates do not change any kernel's shape.
    """
    allowed = [s for s in sorted(spec.stages) if s >= 4]
    if output_stride not in allowed:
        raise SegtrainError(f"models.{owner}.output_stride={output_stride}: {name} supports {allowed}.")
    dilated = [s for s in sorted(spec.stages) if s > output_stride]
    rates = {s: 2 ** (i + 1) for i, s in enumerate(dilated)}
    last = dilated[-1]

    def stage_of(layer_name):
        for s in dilated:
            if re.fullmatch(spec.stages[s], layer_name):
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
