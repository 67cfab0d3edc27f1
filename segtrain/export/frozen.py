"""The serving computation with its variables folded into constants, and naming a graph node's layer.

TFLite's converter takes the serving function with the model's weights as constants: it keeps a
Keras 3 model's variables as READ_VARIABLE ops otherwise, and the LiteRT interpreter then
computes NaN logits (and full-integer calibration fails), so freezing first is not optional.
(tf2onnx freezes by itself.)
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import keras
import tensorflow as tf

from segtrain.compat import frozen_function


def frozen_module(serve: Callable, spec: tf.TensorSpec) -> tf.Module:
    """A variable-free tf.Module whose ``serve`` runs ``serve`` on ``spec`` with the same named outputs."""
    concrete = tf.function(lambda images: serve(images), input_signature=[spec], autograph=False).get_concrete_function()
    frozen = frozen_function(concrete)
    structure = concrete.structured_outputs  # freezing keeps the outputs but flattens their names away
    module = tf.Module()
    module.serve = tf.function(lambda images: tf.nest.pack_sequence_as(structure, frozen(images)),
                               input_signature=[spec], autograph=False)
    return module


def layer_names(model: keras.Model) -> set[str]:
    """The names of every layer of ``model``, nested models' layers included."""
    names, stack = set(), [model]
    while stack:
        layer = stack.pop()
        names.add(layer.name)
        stack.extend(getattr(layer, "layers", ()))
    return names


def layer_of(node: str, names: Iterable[str]) -> str | None:
    """The model layer a graph node (``functional_1/odd_layer_1/Erfinv``) belongs to, or None.

    Keras 3 names a layer's scope after the layer with a call count (``_1``) appended; the
    deepest path component that is a layer's name, with or without it, is the layer.
    """
    names = set(names)
    for part in reversed(node.split("/")[:-1]):
        for candidate in (part, re.sub(r"_\d+$", "", part)):
            if candidate in names:
                return candidate
    return None


def describe_ops(ops: Iterable[tuple[str, str]], names: Iterable[str]) -> str:
    """'layer 'x' (op Erfinv), ...' for (op type, node name) pairs, one entry per layer and op."""
    seen = []
    for op, node in ops:
        layer = layer_of(node, names)
        entry = f"layer '{layer}' (op {op})" if layer else f"op {op} (node {node})"
        if entry not in seen:
            seen.append(entry)
    return ", ".join(seen)
