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


def with_input_channels(model: keras.Model, channels: int, rgb_channels=None) -> keras.Model:
    """``model`` rebuilt to take images of ``channels`` channels, with its weights.

    Every weight is copied; the convolutions that read the input channels (a pretrained
    backbone's first convolution) are extended, a documented choice: with ``rgb_channels``
    (the input channels that hold red, green and blue) or three channels or more, the RGB
    kernels go to the RGB channels (the first three by default) and every other channel gets
    their mean; with one or two channels, each gets the sum of the RGB kernels over the channel
    count (a grey image then gives the response its grey RGB copy gave). A model of 3 channels
    with no RGB mapping to make is returned as it is.

    Raises:
      SegtrainError: the model is not a functional Keras model, or a layer other than a
        convolution depends on the number of input channels.
    """
    import numpy as np

    from segtrain.errors import SegtrainError

    old = model.input_shape[-1] if isinstance(model.input_shape, tuple) else None
    if old == channels and rgb_channels in (None, (0, 1, 2), [0, 1, 2]):
        return model
    if old != 3:
        raise SegtrainError(f"model {model.name} takes {old} input channels; segtrain extends 3-channel (RGB) models "
                            f"to {channels} channels.")
    def rebuilt(bands: int) -> keras.Model:
        def rebuild(network: keras.Model) -> keras.Model:
            def clone(layer):
                # A nested model that takes 3 channels (a backbone) takes the image: rebuilt too.
                if isinstance(layer, keras.Model) and getattr(layer, "input_shape", (None,))[-1] == 3:
                    return rebuild(layer)
                return layer.__class__.from_config(layer.get_config())

            return keras.models.clone_model(network, input_tensors=keras.Input((*network.input_shape[1:-1], bands)),
                                            clone_function=clone)

        try:
            return rebuild(model)
        except Exception as e:  # a subclassed model, or a layer that cannot be rebuilt
            raise SegtrainError(f"model {model.name} cannot be rebuilt for {bands}-channel images ({e}); a plugin "
                                f"model must take them itself.") from None

    # The weights that read the input channels are those whose shape follows them (a 3-channel
    # rebuild, for a new RGB order, is told them by a 4-channel one).
    new = rebuilt(channels if channels != 3 else 4)
    reads_input = {i for i, (a, b) in enumerate(zip(model.weights, new.weights)) if tuple(a.shape) != tuple(b.shape)}
    if channels == 3:
        new = rebuilt(3)
    rgb = list(rgb_channels) if rgb_channels is not None else ([0, 1, 2] if channels >= 3 else None)
    for i, (source, target) in enumerate(zip(model.weights, new.weights)):
        value = source.numpy()
        if i in reads_input:
            if value.ndim != 4 or value.shape[2] != 3:
                raise SegtrainError(f"model {model.name}: weight {source.path} {list(source.shape)} depends on the "
                                    f"number of input channels and is not a convolution kernel over them: the model "
                                    f"cannot be extended to {channels} channels.")
            if rgb is None:
                value = np.repeat(value.sum(axis=2, keepdims=True) / channels, channels, axis=2)
            else:
                extended = np.repeat(value.mean(axis=2, keepdims=True), channels, axis=2)
                extended[:, :, rgb, :] = value
                value = extended
        target.assign(value)
    for key in _FACTS:  # the facts travel in the config; kept here whatever the clone did
        if hasattr(model, key):
            setattr(new, key, getattr(model, key))
    return new
