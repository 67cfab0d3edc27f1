"""Why a segmentation model predicts a class where it does: Grad-CAM maps and activation grids.

Grad-CAM for segmentation (Seg-Grad-CAM, Vinogradova et al. 2020, after Selvaraju et al. 2017):
the target is the sum of one class's pre-softmax logits over a region of the image (the pixels
predicted as that class, or a box). Each channel ``k`` of a chosen layer's activations ``A``
gets the weight ``w_k``, the spatial mean of ``d target / d A_k``; the map is
``ReLU(sum_k w_k A_k)``, resized bilinearly to the image and divided by its maximum. A region
the class is predicted nowhere in gives a target of 0 and an all-zero map.

The layer is by default the model's ``cam_layer`` fact (its deepest encoder stage); a model
without one gets its layer of smallest feature map (the last of them in graph order; 1x1 maps of
global pooling left out). Any layer of the model's own graph can be chosen by name, ``name:i``
for output ``i`` of a layer with several (a nested backbone model returns its stages' maps).
Layers inside a nested model are not outputs of the outer graph, so they cannot be chosen; the
nested model's outputs can.

Images come in normalised (the model's input) and are padded at the bottom and right to the
model's size divisor, as inference pads them; the logits and the map are cropped back. The map
is stretched over the padded image, so a model that pads its input inside (unet_original's
overlap tile) gets a map stretched over more than the image.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from segtrain import compat
from segtrain.errors import SegtrainError
from segtrain.images import blend
from segtrain.models.model import facts
from segtrain.task import Task

LIST = "list"  # the --layer value that lists the layers
MAX_CHANNELS = 64  # channels an activation grid shows at most
MIN_TILE = 32  # an activation grid's tiles are enlarged to at least this many pixels a side
REFERENCE_SIDE = 256  # the image side layer shapes are worked out at when the model takes any size


@dataclasses.dataclass(frozen=True)
class Explanation:
    """The Grad-CAM of one image.

    Attributes:
      cam: float32 [H,W] in [0,1], the map at the image's size (all zeros for an empty region).
      raw: float32 [h,w], ``ReLU(sum_k w_k A_k)`` at the layer's resolution, before resizing.
      weights: float32 [K], the channel weights ``w_k``.
      activations: float32 [h,w,K], the layer's activations ``A``.
      region_pixels: pixels in the target region (0: the class is predicted nowhere / empty box).
      target: the summed logits the gradients are of.
    """

    cam: np.ndarray
    raw: np.ndarray
    weights: np.ndarray
    activations: np.ndarray
    region_pixels: int
    target: float


def _graph(model: keras.Model) -> keras.Model:
    """The functional graph of ``model`` (a Sequential model's inner one)."""
    graph = model if hasattr(model, "_nodes") else getattr(model, "_functional", None)
    if graph is None or not hasattr(graph, "_nodes") or not getattr(graph, "inputs", None):
        raise SegtrainError(f"Model {model.name!r} ({type(model).__name__}) is not a functional Keras model: "
                            f"Grad-CAM needs one built as keras.Model(inputs, outputs) to reach its layers.")
    return graph


def _call_outputs(graph: keras.Model, layer) -> list:
    """The outputs of ``layer``'s call in ``graph`` (segtrain.compat.layer_call_outputs)."""
    return compat.layer_call_outputs(graph, layer)


def layer_outputs(model: keras.Model) -> dict[str, keras.KerasTensor]:
    """{name (``name:i`` for output i of a multi-output layer): symbolic output}, in graph order."""
    graph = _graph(model)
    found = {}
    for layer in graph.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        outputs = _call_outputs(graph, layer)
        for i, tensor in enumerate(outputs):
            found[layer.name if len(outputs) == 1 else f"{layer.name}:{i}"] = tensor
    return found


def reference_shape(model: keras.Model) -> tuple[int, int, int, int]:
    """The input shape layer shapes are worked out at: the model's own if fixed, else a square
    of REFERENCE_SIDE rounded up to the size divisor."""
    divisor = facts(model).size_divisor
    side = divisor * -(-REFERENCE_SIDE // divisor)
    fixed = tuple(_graph(model).inputs[0].shape[1:4])
    return (1, fixed[0] or side, fixed[1] or side, fixed[2] or 3)


def layer_shapes(model: keras.Model, input_shape: Sequence[int] | None = None) -> dict[str, tuple]:
    """{layer name: output shape} for one input of ``input_shape`` (default: see reference_shape).

    Shapes are inferred symbolically: nothing is computed.
    """
    outputs = layer_outputs(model)
    graph = _graph(model)
    shape = tuple(input_shape or reference_shape(model))
    specs = keras.Model(graph.inputs, list(outputs.values())).compute_output_spec(keras.KerasTensor(shape))
    return {name: tuple(spec.shape) for name, spec in zip(outputs, keras.tree.flatten(specs))}


def deepest_layer(model: keras.Model) -> str:
    """The layer with the smallest feature map (rank 4, not 1x1), the last such in graph order."""
    best, best_area = None, math.inf
    for name, shape in layer_shapes(model).items():
        area = shape[1] * shape[2] if len(shape) == 4 and shape[1] and shape[2] else 0
        if 1 < area <= best_area:
            best, best_area = name, area
    if best is None:
        raise SegtrainError(f"Model {model.name!r} has no layer with a feature map [B,h,w,K] to explain.")
    return best


def choose_layer(model: keras.Model, layer: str | None = None) -> str:
    """The layer Grad-CAM weighs: ``layer`` if given, else the model's cam_layer fact, else the deepest.

    A layer name alone, for a layer with several outputs, means its last output.

    Raises:
      SegtrainError: an unknown name (with the closest names), or a layer without a feature map.
    """
    names = layer_outputs(model)
    where = "--layer"
    if not layer:
        layer, where = facts(model).cam_layer, f"model {model.name!r}'s cam_layer"
        if not layer:
            return deepest_layer(model)
    if layer not in names:
        several = [n for n in names if n.rpartition(":")[0] == layer]
        if several:
            return max(several, key=lambda n: int(n.rpartition(":")[2]))
        close = difflib.get_close_matches(layer, list(names), n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise SegtrainError(f"{where}={layer}: model {model.name!r} has no such layer.{hint} "
                            f"`segtrain explain --layer=list` lists its layers.")
    if len(names[layer].shape) != 4:
        raise SegtrainError(f"{where}={layer}: its output has shape {tuple(names[layer].shape)}; Grad-CAM needs "
                            f"a feature map [B,h,w,K].")
    return layer


def class_index(value: str | int, class_names: Sequence[str]) -> int:
    """The index of a class given by name (exact, then ignoring case) or by index.

    Raises:
      SegtrainError: neither a class name nor an index; the message lists the classes.
    """
    text = str(value).strip()
    if text in class_names:
        return list(class_names).index(text)
    lower = [n.lower() for n in class_names]
    if text.lower() in lower:
        return lower.index(text.lower())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    listed = ", ".join(f"{i}={n}" for i, n in enumerate(class_names))
    close = difflib.get_close_matches(text, list(class_names), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise SegtrainError(f"--class={text}: not a class of this run.{hint} Its classes: {listed}.")


def parse_box(values: Sequence[str | int] | None) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) from the --box values: pixels, y1 and x1 excluded.

    Raises:
      SegtrainError: not four integers with 0 <= y0 < y1 and 0 <= x0 < x1.
    """
    if values is None:
        return None
    try:
        box = tuple(int(str(v).strip()) for v in values)
    except ValueError:
        box = ()
    if len(box) != 4 or min(box) < 0 or box[0] >= box[2] or box[1] >= box[3]:
        raise SegtrainError(f"--box={','.join(str(v) for v in values)}: give Y0,X0,Y1,X1 in pixels with "
                            f"0 <= Y0 < Y1 and 0 <= X0 < X1 (Y1 and X1 excluded), e.g. --box=8,8,40,40.")
    return box


class GradCam:
    """Grad-CAM of a model at one layer; build it once, call it per image.

    Args:
      model: a functional model from images [B,H,W,3] to logits [B,H,W,C].
      layer: the layer to weigh (see ``choose_layer``; default: the model's cam_layer).
      size_divisor: pad images to multiples of this (default: the model's fact).
      task: what the logits mean (default: classes): which pixels are "predicted as" a class or label.
    """

    def __init__(self, model: keras.Model, layer: str | None = None, size_divisor: int | None = None,
                 task: Task | None = None):
        self.task = task or Task(1)
        self.layer = choose_layer(model, layer)
        graph = _graph(model)
        self.size_divisor = size_divisor or facts(model).size_divisor
        self._probe = keras.Model(graph.inputs, [layer_outputs(model)[self.layer], graph.outputs[0]])

    def __call__(self, image: np.ndarray, class_id: int, box: tuple[int, int, int, int] | None = None) -> Explanation:
        """The Grad-CAM of ``class_id`` on one normalised image [H,W,3].

        Args:
          image: the model's input for one image (normalised), any height and width.
          class_id: the class whose logits are the target.
          box: (y0, x0, y1, x1) pixels of the region (y1, x1 excluded, clipped to the image);
            None: the pixels predicted as ``class_id``.

        Raises:
          SegtrainError: the layer does not lead to the logits.
        """
        image = np.asarray(image, np.float32)
        height, width = image.shape[:2]
        d = self.size_divisor
        x = tf.constant(np.pad(image, [(0, -height % d), (0, -width % d), (0, 0)])[np.newaxis])
        # Eager: explaining a few images costs less than tracing a large model would.
        with tf.GradientTape() as tape:
            activations, logits = self._probe(x, training=False)
            logits = tf.cast(logits, tf.float32)[0, :height, :width]
            if box is None:
                mask = self.task.region(logits, class_id).numpy().astype(np.float32)
            else:
                mask = np.zeros((height, width), np.float32)
                mask[box[0]:box[2], box[1]:box[3]] = 1.0
            target = tf.reduce_sum(logits[..., class_id] * mask)
        grads = tape.gradient(target, activations)
        if grads is None:
            raise SegtrainError(f"--layer={self.layer}: the layer does not lead to the model's logits; "
                                f"choose another (`--layer=list` lists them).")
        a = tf.cast(activations[0], tf.float32)
        weights = tf.reduce_mean(tf.cast(grads[0], tf.float32), axis=(0, 1))
        raw = tf.nn.relu(tf.reduce_sum(a * weights, axis=-1))
        cam = tf.image.resize(raw[tf.newaxis, :, :, tf.newaxis], x.shape[1:3], method="bilinear")
        cam = cam.numpy()[0, :height, :width, 0]  # the map of the padded image, cropped like the logits
        peak = cam.max()
        cam = cam / peak if peak > 0 else np.zeros_like(cam)  # an all-zero map stays zero
        return Explanation(cam=cam, raw=raw.numpy(), weights=weights.numpy(), activations=a.numpy(),
                           region_pixels=int(mask.sum()), target=float(target))


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """uint8 [...,3] colours of ``values`` in [0,1] on a jet-like ramp: dark blue, cyan, yellow, dark red."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., np.newaxis]
    centres = np.array([0.75, 0.5, 0.25], np.float32)  # where red, green and blue peak
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)
    return np.round(255 * rgb).astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """uint8 [H,W,3]: the map's colours (``colour_ramp``) blended over the image."""
    return blend(image, colour_ramp(cam), alpha)


def activation_grid(activations: np.ndarray, max_channels: int = MAX_CHANNELS, min_tile: int = MIN_TILE) -> np.ndarray:
    """uint8 [H,W,3]: a layer's channels side by side, as intermediate activations are usually shown.

    The first ``max_channels`` channels of ``activations`` [h,w,K], each min-max normalised to
    [0,1] on its own (a constant channel shows as 0) and coloured with ``colour_ramp``, are tiled
    row by row into a near-square grid (``ceil(sqrt(n))`` columns) with a 1-pixel white
    separator. Tiles are enlarged (nearest neighbour) by a whole factor to at least ``min_tile``
    pixels a side.
    """
    a = np.asarray(activations, np.float32)[..., :max_channels]
    h, w, n = a.shape
    low, high = a.min(axis=(0, 1)), a.max(axis=(0, 1))
    spread = np.where(high > low, high - low, 1.0)
    normed = np.where(high > low, (a - low) / spread, 0.0)
    scale = max(1, -(-min_tile // max(min(h, w), 1)))
    tiles = colour_ramp(normed.repeat(scale, axis=0).repeat(scale, axis=1))  # [h*s, w*s, n, 3]
    th, tw = h * scale, w * scale
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (th + 1) - 1, cols * (tw + 1) - 1, 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[r * (th + 1): r * (th + 1) + th, c * (tw + 1): c * (tw + 1) + tw] = tiles[:, :, k]
    return grid
