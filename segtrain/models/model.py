"""The model class every built-in model is: a functional Keras model that carries its own facts.

The input pipeline and evaluation need to know a few things about a model: the multiple its
input height and width must be (``size_divisor``), how much it downsamples
(``output_stride``), the input preprocessing its pretrained weights expect
(``preprocessing``: a keras.applications mode such as ``'caffe'``, or None for the pipeline's
default), and the layer whose activations explain its predictions (``cam_layer``: the deepest
encoder stage, which Grad-CAM weighs by default). They are constructor arguments and part of
``get_config()``, so a model saved with ``model.save('m.keras')`` and loaded with
``keras.models.load_model`` still knows them.

Plugin models may be any keras.Model; ``facts(model)`` falls back to attributes of the same
names and then to the defaults.
"""

from __future__ import annotations

import dataclasses

import keras

_FACTS = ("size_divisor", "output_stride", "preprocessing", "cam_layer")


@keras.saving.register_keras_serializable(package="segtrain")
class SegmentationModel(keras.Model):
    """A functional model from images [B,H,W,3] to logits [B,H,W,C], with its facts.

    Args:
      inputs, outputs, name: as ``keras.Model(inputs, outputs, name=...)``.
      size_divisor: input height and width must be multiples of this (1: any size).
      output_stride: input size over the coarsest feature map's size.
      preprocessing: the input preprocessing the model's weights expect ('caffe', 'tf',
        'torch'), or None when they expect none in particular.
      cam_layer: the name of the layer whose output is the deepest encoder stage (Grad-CAM's
        default layer); ``name:i`` for output ``i`` of a layer with several (a nested backbone
        model). None: `segtrain explain` takes the layer with the smallest feature map.
    """

    # The signature stays (inputs, outputs, name, **kwargs), the one Keras revives functional
    # models with: the facts travel in kwargs and in get_config().
    def __init__(self, inputs, outputs, name=None, **kwargs):
        facts = {key: kwargs.pop(key, None) for key in _FACTS}
        super().__init__(inputs, outputs, name=name, **kwargs)
        self.size_divisor = int(facts["size_divisor"] or 1)
        self.output_stride = None if facts["output_stride"] is None else int(facts["output_stride"])
        self.preprocessing = facts["preprocessing"]
        self.cam_layer = facts["cam_layer"]

    def get_config(self):
        return {**super().get_config(), "size_divisor": self.size_divisor,
                "output_stride": self.output_stride, "preprocessing": self.preprocessing,
                "cam_layer": self.cam_layer}


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the pipeline and evaluation need to know about a model (see the module doc)."""

    size_divisor: int = 1
    output_stride: int | None = None
    preprocessing: str | None = None
    cam_layer: str | None = None


def facts(model: keras.Model) -> ModelFacts:
    """The facts of any model: a SegmentationModel's own, else a plugin model's attributes."""
    return ModelFacts(
        size_divisor=int(getattr(model, "size_divisor", 1) or 1),
        output_stride=getattr(model, "output_stride", None),
        preprocessing=getattr(model, "preprocessing", None),
        cam_layer=getattr(model, "cam_layer", None),
    )


def leaf_layers(model: keras.Model) -> list:
    """The layers of ``model``, nested models (a backbone) opened up, as far as Keras exposes
    them (``.layers``); a custom layer with sublayers of its own counts as one."""
    found = []

    def walk(layer):
        children = getattr(layer, "layers", None)
        if children:
            for child in children:
                walk(child)
        else:
            found.append(layer)

    walk(model)
    return found


def synchronize_batch_norm(model: keras.Model, synchronized: bool = True) -> int:
    """Makes every batch norm of ``model`` (backbone, encoder, decoder, head) compute its batch
    statistics over all replicas (``synchronized=True``), or each over its own batch.

    Keras reads the flag at every call, so a built model changes at once, and its saved config
    says so. Returns the number of batch norm layers.
    """
    layers = [layer for layer in leaf_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.synchronized = synchronized
    return len(layers)
