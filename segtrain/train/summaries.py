"""TensorBoard output: scalars, image panels, the confusion matrix, text."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from segtrain.data.info import DatasetInfo


def write_scalars(writer, values: Mapping[str, object], step: int, class_names: Sequence[str] = ()) -> None:
    """Scalars, with per-class vectors split into one scalar per class (``per_class_iou/cat``)."""
    with writer.as_default(step=step):
        for name, value in values.items():
            if isinstance(value, (list, tuple, np.ndarray)):
                for i, v in enumerate(value):
                    if v is not None and np.isfinite(v):
                        label = class_names[i] if i < len(class_names) else str(i)
                        tf.summary.scalar(f"{name}/{label}", float(v))
            elif value is not None:
                tf.summary.scalar(name, float(value))


def colourize(label: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """[H,W] class ids -> [H,W,3] uint8 in the dataset palette (ignore label white)."""
    return info.palette_array()[np.asarray(label).astype(np.int64) & 255]


def panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Input | ground truth | prediction | prediction overlaid on the input, side by side."""
    truth = colourize(label, info)
    predicted = colourize(prediction, info)
    overlay = (0.5 * image + 0.5 * predicted).astype(np.uint8)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([image, gap, truth, gap, predicted, gap, overlay], axis=1)


def confusion_image(cm: np.ndarray, cell: int = 24) -> np.ndarray:
    """The row-normalised confusion matrix as a heat map, [C*cell, C*cell, 3] uint8.

    Row i (ground truth) runs top to bottom, column j (prediction) left to right; white is 0,
    dark blue is 1. Normalising rows shows recall per class whatever the class frequencies.
    """
    cm = np.asarray(cm, np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = (white + (blue - white) * norm[..., None]).astype(np.uint8)
    rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    rgb[::cell, :] = rgb[:, ::cell] = 200  # grid lines
    return rgb


def confusion_markdown(cm: np.ndarray, class_names: Sequence[str]) -> str:
    """The raw counts as a Markdown table (rows = ground truth)."""
    header = "| truth \\ predicted | " + " | ".join(class_names) + " |"
    lines = [header, "|" + "---|" * (len(class_names) + 1)]
    for name, row in zip(class_names, np.asarray(cm)):
        lines.append(f"| **{name}** | " + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines)


def write_images(writer, tag: str, images: Sequence[np.ndarray], step: int) -> None:
    """One image summary per image (they may differ in size)."""
    with writer.as_default(step=step):
        for i, image in enumerate(images):
            tf.summary.image(f"{tag}/{i}", image[None], step=step)


def write_text(writer, tag: str, text: str, step: int) -> None:
    with writer.as_default(step=step):
        tf.summary.text(tag, text, step=step)


def gin_markdown(config: str) -> str:
    """Gin text indented as code so TensorBoard's Markdown renders it verbatim."""
    return "\n".join("    " + line for line in config.splitlines())
