"""TensorBoard output: scalars, image panels, the confusion matrix, text."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from segtrain.data.info import DatasetInfo
from segtrain.io import WriteError, os_reason
from segtrain.plots import as_table


def file_writer(logdir: str, **kwargs):
    """tf.summary.create_file_writer, with a full or read-only disk as one WriteError naming
    ``logdir`` (the empty events file TensorFlow leaves behind is removed)."""
    before = set(tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*")) if tf.io.gfile.isdir(logdir) else set()
    try:
        return tf.summary.create_file_writer(logdir, **kwargs)
    except tf.errors.OpError as e:
        for path in set(tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*")) - before:
            try:
                tf.io.gfile.remove(path)
            except tf.errors.OpError:
                pass
        raise WriteError(logdir, os_reason(e), "TensorBoard events in") from None


def flush(writer, logdir: str) -> None:
    """``writer.flush()``; a failed write is one WriteError naming ``logdir``."""
    try:
        writer.flush()
    except tf.errors.OpError as e:
        raise WriteError(logdir, os_reason(e), "TensorBoard events in") from None


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
    cm = cm.reshape(-1, 2) if cm.ndim == 3 else cm  # per-label [L, 2, 2]: two rows per label
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = (white + (blue - white) * norm[..., None]).astype(np.uint8)
    rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    rgb[::cell, :] = rgb[:, ::cell] = 200  # grid lines
    return rgb


def confusion_markdown(cm: np.ndarray, class_names: Sequence[str]) -> str:
    """The raw counts as a Markdown table (rows = ground truth)."""
    cm, row_names, column_names = as_table(cm, class_names)
    header = "| truth \\ predicted | " + " | ".join(column_names) + " |"
    lines = [header, "|" + "---|" * (len(column_names) + 1)]
    for name, row in zip(row_names, np.asarray(cm)):
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


class EventWriter:
    """The summary writer of one of a run's logdirs (``train/``, ``eval/``) that can go back.

    A run that goes back to a checkpoint's step (``train.on_nan = 'restore'``) trains the steps
    after it again; ``rewind`` closes the events file, removes the events after that step and
    opens a new file, so TensorBoard shows one value per step. Without ``logdir`` (a worker that
    is not the chief) it writes nothing.
    """

    def __init__(self, logdir: str | None):
        self.logdir = logdir
        self._writer = file_writer(logdir) if logdir else tf.summary.create_noop_writer()

    def as_default(self, step=None):
        return self._writer.as_default(step=step)

    def flush(self) -> None:
        if self.logdir:
            flush(self._writer, self.logdir)

    def close(self) -> None:
        self._writer.close()

    def rewind(self, step: int, keep: Sequence[str] = ()) -> None:
        """Removes what was written after ``step`` (but the ``keep`` tags) and writes on."""
        if not self.logdir:
            return
        self._writer.close()
        purge_after(self.logdir, step, keep=keep)
        self._writer = file_writer(self.logdir)


def purge_after(logdir: str, step: int, at_step: Sequence[str] = (), keep: Sequence[str] = ()) -> int:
    """Removes the events after ``step`` (and those of the ``at_step`` tags at ``step``) from the
    event files in ``logdir``, except those of the ``keep`` tags; returns how many it removed.

    A resumed run trains again from its last checkpoint at ``step``: without this, TensorBoard
    would show two values at every step between that checkpoint and where the run was stopped.
    Each changed file is rewritten through a temporary file and a rename; an unreadable end (a
    process killed while writing) ends the file there.
    """
    removed = 0
    for path in sorted(tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*")):
        kept, dropped = [], 0
        try:
            for record in tf.data.TFRecordDataset(path):
                raw = record.numpy()
                event = tf.compat.v1.Event.FromString(raw)
                tags = {value.tag for value in event.summary.value}
                if tags & set(keep):
                    kept.append(raw)
                elif event.step > step or (event.step == step and tags & set(at_step)):
                    dropped += 1
                else:
                    kept.append(raw)
        except tf.errors.DataLossError:
            dropped += 1  # a truncated last record
        if not dropped:
            continue
        temporary = f"{path}.purge.tmp"
        try:
            with tf.io.TFRecordWriter(temporary) as writer:
                for raw in kept:
                    writer.write(raw)
            tf.io.gfile.rename(temporary, path, overwrite=True)
        except tf.errors.OpError as e:
            if tf.io.gfile.exists(temporary):
                tf.io.gfile.remove(temporary)
            raise WriteError(path, os_reason(e), "TensorBoard events") from None
        removed += dropped
    return removed
