"""What a model's outputs mean: one class per pixel (softmax) or any set of labels per pixel (sigmoid).

Every consumer of logits asks the ``Task`` for probabilities, predicted labels and the counts
metrics are computed from, so training, evaluation, predict, export and explain agree.

- **Classes** (the default): a label map holds one class id per pixel, 0..C-1, or the ignore
  label. Probabilities are the softmax; the prediction is the argmax; the counts are a C x C
  confusion matrix (rows: ground truth, columns: prediction).
- **Multi-label** (``DatasetInfo.multilabel``): a pixel carries any subset of L labels (L <= 7),
  stored as bits in the same single-channel uint8 label map: bit i set = label i present
  (value 5 = labels 0 and 2), 0 = none, the ignore label (255) = not counted. Resizing with
  nearest neighbour, flips, crops and ignore-label padding keep working unchanged. Binary
  segmentation (one foreground class) is the case L = 1: a mask of 0 and 1. Probabilities are
  the sigmoid of each label's logit; label i is predicted where its probability exceeds
  ``threshold``; the prediction is packed into bits the same way. The counts are one 2 x 2
  confusion matrix per label, [L, 2, 2] (rows: absent / present in the ground truth, columns:
  predicted absent / present), which the metrics read label by label.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from segtrain.errors import SegtrainError

MAX_LABELS = 7  # bits of a uint8 label map below the ignore label 255 (values 0..127)


@dataclasses.dataclass(frozen=True)
class Task:
    """How logits turn into probabilities, predictions and metric counts.

    Attributes:
      num_classes: C classes, or L labels when ``multilabel``.
      ignore_label: label value left out of losses and metrics.
      multilabel: sigmoid outputs, labels packed as bits (see the module's docstring).
      threshold: multi-label: a label is predicted where its probability exceeds this.
      temperature: probabilities are those of logits / temperature (temperature scaling, fitted
        by `segtrain evaluate --calibrate`); argmax predictions are the same at any temperature.
    """

    num_classes: int
    ignore_label: int = 255
    multilabel: bool = False
    threshold: float = 0.5
    temperature: float = 1.0

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                or not 0.0 < self.threshold < 1.0:
            raise SegtrainError(f"inference.threshold={self.threshold!r}: use a probability strictly between 0 and 1, "
                                f"e.g. 0.5.")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0.0 < self.temperature < float("inf"):
            raise SegtrainError(f"inference.temperature={self.temperature!r}: use a number above 0 (1: the model's own "
                                f"probabilities).")
        if self.multilabel:
            check_multilabel(self.num_classes, self.ignore_label)

    @classmethod
    def of(cls, info, threshold: float = 0.5, temperature: float = 1.0) -> Task:
        """The task of a dataset's facts (a DatasetInfo, or anything with its attributes)."""
        return cls(int(info.num_classes), int(info.ignore_label), bool(getattr(info, "multilabel", False)),
                   float(threshold), float(temperature))

    @property
    def counts_shape(self) -> tuple[int, ...]:
        """The shape of the counts: [C, C], or [L, 2, 2] for multi-label."""
        c = self.num_classes
        return (c, 2, 2) if self.multilabel else (c, c)

    def probabilities(self, logits) -> tf.Tensor:
        """float32 [..., C] softmax of the classes, or [..., L] sigmoid of each label (of logits / temperature)."""
        logits = tf.cast(logits, tf.float32)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return tf.sigmoid(logits) if self.multilabel else tf.nn.softmax(logits, axis=-1)

    def logits_of(self, probabilities) -> tf.Tensor:
        """Logits whose probabilities are ``probabilities`` (averaged test-time views): the log
        for classes, the log-odds for labels, times the temperature; clipped, so a probability
        of 0 or 1 stays finite."""
        p = tf.clip_by_value(tf.cast(probabilities, tf.float32), 1e-12, 1.0)
        logits = tf.math.log(p) if not self.multilabel else tf.math.log(p) - tf.math.log(tf.maximum(1.0 - p, 1e-12))
        return logits * self.temperature if self.temperature != 1.0 else logits

    def predict(self, logits) -> tf.Tensor:
        """int32 [...]: the argmax class, or the predicted labels packed into bits."""
        if not self.multilabel:
            return tf.argmax(logits, axis=-1, output_type=tf.int32)
        return self.from_probabilities(self.probabilities(logits))

    def from_probabilities(self, probabilities) -> tf.Tensor:
        """int32 [...] predictions of probabilities (as ``predict`` makes them from logits)."""
        if not self.multilabel:
            return tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return pack(tf.convert_to_tensor(probabilities) > self.threshold)

    def region(self, logits, index: int) -> tf.Tensor:
        """bool [...]: the pixels predicted as class ``index`` (multi-label: that carry label ``index``)."""
        if not self.multilabel:
            return tf.equal(self.predict(logits), index)
        return self.probabilities(logits)[..., index] > self.threshold

    def counts(self, labels, predictions) -> tf.Tensor:
        """int64 counts of one batch: a C x C confusion matrix, or [L, 2, 2] per-label matrices;
        ignored pixels are not counted."""
        if not self.multilabel:
            return confusion_matrix(labels, predictions, self.num_classes, self.ignore_label)
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        predictions = tf.reshape(tf.cast(predictions, tf.int32), [-1])
        valid = tf.not_equal(labels, self.ignore_label)
        n = self.num_classes
        truth = unpack(tf.where(valid, labels, 0), n)  # [P, L]
        predicted = unpack(predictions, n)
        index = tf.range(n)[tf.newaxis] * 4 + truth * 2 + predicted
        index = tf.where(valid[:, tf.newaxis], index, n * 4)  # ignored pixels: a slot sliced away
        counts = tf.math.unsorted_segment_sum(tf.ones_like(index, tf.int64), index, n * 4 + 1)
        return tf.reshape(counts[: n * 4], [n, 2, 2])


def check_multilabel(num_labels: int, ignore_label: int, what: str = "a multi-label dataset") -> None:
    """Multi-label maps hold up to MAX_LABELS labels as bits, below the ignore label."""
    if not 1 <= num_labels <= MAX_LABELS:
        raise SegtrainError(f"{what} has {num_labels} labels; multi-label masks are stored as bits of an 8-bit "
                            f"label map, 1 to {MAX_LABELS} labels.")
    if ignore_label < 2 ** num_labels:
        raise SegtrainError(f"{what}: the ignore label {ignore_label} is a combination of its {num_labels} labels "
                            f"(values 0..{2 ** num_labels - 1}); use 255.")


def unpack(packed, num_labels: int) -> tf.Tensor:
    """int32 [..., L] 0/1: bit i of each value."""
    packed = tf.cast(packed, tf.int32)[..., tf.newaxis]
    return tf.bitwise.bitwise_and(tf.bitwise.right_shift(packed, tf.range(num_labels)), 1)


def pack(present) -> tf.Tensor:
    """int32 [...]: bool or 0/1 [..., L] packed into bits (label i -> bit i)."""
    present = tf.cast(present, tf.int32)
    weights = tf.bitwise.left_shift(1, tf.range(tf.shape(present)[-1]))
    return tf.reduce_sum(present * weights, axis=-1)


def unpack_np(packed: np.ndarray, num_labels: int) -> np.ndarray:
    """NumPy ``unpack``: uint8 [..., L] 0/1."""
    packed = np.asarray(packed).astype(np.int64)[..., np.newaxis]
    return ((packed >> np.arange(num_labels)) & 1).astype(np.uint8)


def pack_np(present: np.ndarray) -> np.ndarray:
    """NumPy ``pack``: uint8 [...] of bool [..., L]."""
    present = np.asarray(present).astype(np.int64)
    return (present << np.arange(present.shape[-1])).sum(-1).astype(np.uint8)


def label_palette(palette, ignore_label: int = 255) -> np.ndarray:
    """[256, 3] uint8 colours of packed label values: the mean colour of the labels present
    (none: black), the ignore label white."""
    colours = np.asarray(palette, np.float64).reshape(-1, 3)
    table = np.zeros((256, 3), np.uint8)
    for value in range(1, min(2 ** len(colours), 256)):
        present = unpack_np(value, len(colours)).astype(bool)
        table[value] = np.round(colours[present].mean(0)).astype(np.uint8)
    table[ignore_label] = (255, 255, 255)
    return table


def confusion_matrix(labels, predictions, num_classes: int, ignore_label: int = 255) -> tf.Tensor:
    """C x C int64 counts of one batch: entry [i, j] = pixels of class i predicted as j.

    Args:
      labels: int [...] ground truth; pixels equal to ``ignore_label`` are not counted.
      predictions: int [...] predicted classes, same shape.
      num_classes: C.
      ignore_label: label value to leave out.
    """
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    predictions = tf.reshape(tf.cast(predictions, tf.int32), [-1])
    valid = tf.not_equal(labels, ignore_label)
    # Invalid pixels go to an extra row that is sliced away: no data-dependent shapes, so
    # this compiles with XLA and runs per replica.
    index = tf.where(valid, labels * num_classes + predictions, num_classes * num_classes)
    counts = tf.math.unsorted_segment_sum(
        tf.ones_like(index, tf.int64), index, num_classes * num_classes + 1
    )
    return tf.reshape(counts[: num_classes * num_classes], [num_classes, num_classes])

