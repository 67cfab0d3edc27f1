"""Metrics, all pure functions of one summed confusion matrix.

``confusion_matrix`` counts one batch (rows = ground truth, columns = prediction, ignore-label
pixels left out). The evaluation sums those counts over batches and replicas, then every
registered metric is computed from the sum, so metrics never average per-batch means.

The definitions are MMSegmentation's (``IoUMetric.total_area_to_metrics``): per class, IoU =
TP / (truth + predicted - TP), accuracy (recall) = TP / truth, Dice = 2 TP / (truth +
predicted); a mean is over the classes whose value is defined. So:

- a class absent from both ground truth and prediction counts in no mean;
- a class that appears only in predictions has no recall: it is left out of mean accuracy, and
  counts as 0 in mean IoU and Dice (its false positives are real errors);
- a class in the ground truth that is never predicted counts as 0 everywhere;
- ignore-label pixels count nowhere, not even as a wrong prediction.

Multi-label (and binary) tasks (segtrain.task) count one 2 x 2 matrix per label, [L, 2, 2], and
every metric reads it label by label, with the label's "present" as the class: per label, TP =
pixels where the label is both true and predicted (probability > ``inference.threshold``), IoU
= TP / (true + predicted - TP), accuracy = recall = TP / true, Dice = 2 TP / (true + predicted);
means are over the labels whose value is defined, by the same rules as classes. Absent-label
pixels are not a class of their own, so a rare foreground is not drowned by the background: a
model that predicts no foreground scores IoU 0 for it, not NaN, from its first evaluation.
``pixel_accuracy`` counts every correct (pixel, label) decision, present or absent.
"""

from __future__ import annotations

import tensorflow as tf

from registry import METRICS
from segtrain.task import confusion_matrix  # noqa: F401 (the metrics' counts, re-exported)


def _parts(cm):
    """(cm, TP, ground-truth pixels, predicted pixels) per class; for per-label counts [L, 2, 2]
    those of each label's "present" row and column."""
    cm = tf.cast(tf.convert_to_tensor(cm), tf.float64)
    if cm.shape.rank == 3:
        return cm, cm[:, 1, 1], tf.reduce_sum(cm[:, 1, :], axis=1), tf.reduce_sum(cm[:, :, 1], axis=1)
    tp = tf.linalg.diag_part(cm)
    truth = tf.reduce_sum(cm, axis=1)
    predicted = tf.reduce_sum(cm, axis=0)
    return cm, tp, truth, predicted



def _nan_mean(values, mask):
    values = tf.boolean_mask(values, mask)
    return tf.cond(
        tf.size(values) > 0,
        lambda: tf.reduce_mean(values),
        lambda: tf.constant(float("nan"), tf.float64),
    )


@METRICS.register("pixel_accuracy")
def pixel_accuracy(cm) -> tf.Tensor:
    """Correct pixels over all counted pixels (multi-label: correct pixel-label decisions, present
    or absent, over all of them)."""
    cm, _, _, _ = _parts(cm)
    return tf.math.divide_no_nan(tf.reduce_sum(tf.linalg.trace(cm)), tf.reduce_sum(cm))


@METRICS.register("per_class_accuracy")
def per_class_accuracy(cm) -> tf.Tensor:
    """Recall of each class, TP / ground-truth pixels; NaN for a class not in the ground truth."""
    _, tp, truth, _ = _parts(cm)
    return _per_class(tp, truth, truth)


@METRICS.register("mean_accuracy")
def mean_accuracy(cm) -> tf.Tensor:
    """Mean of the per-class accuracies (recall) over the classes in the ground truth."""
    _, tp, truth, _ = _parts(cm)
    return _nan_mean(tf.math.divide_no_nan(tp, truth), truth > 0)


@METRICS.register("per_class_iou")
def per_class_iou(cm) -> tf.Tensor:
    """Intersection over union of each class; NaN for a class never seen."""
    _, tp, truth, predicted = _parts(cm)
    union = truth + predicted - tp
    return _per_class(tp, union, union)


@METRICS.register("mean_iou")
def mean_iou(cm) -> tf.Tensor:
    """Mean intersection over union over the classes seen."""
    _, tp, truth, predicted = _parts(cm)
    union = truth + predicted - tp
    return _nan_mean(tf.math.divide_no_nan(tp, union), union > 0)


@METRICS.register("dice")
def dice(cm) -> tf.Tensor:
    """Mean Dice (F1), 2 TP / (ground truth + predicted), over the classes seen."""
    _, tp, truth, predicted = _parts(cm)
    return _nan_mean(tf.math.divide_no_nan(2.0 * tp, truth + predicted), truth + predicted > 0)


@METRICS.register("per_class_dice")
def per_class_dice(cm) -> tf.Tensor:
    """Dice of each class; NaN for a class never seen."""
    _, tp, truth, predicted = _parts(cm)
    return _per_class(2.0 * tp, truth + predicted, truth + predicted)


def _per_class(numerator, denominator, seen):
    return tf.where(seen > 0, tf.math.divide_no_nan(numerator, denominator), float("nan"))


DEFAULT_METRICS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "per_class_iou", "dice")


def compute(cm, names=DEFAULT_METRICS) -> dict:
    """Every named metric of a summed confusion matrix, as Python floats / lists."""
    results = {}
    for name in names:
        value = METRICS.get(name)(cm).numpy()
        results[name] = value.tolist() if getattr(value, "ndim", 0) else float(value)
    return results
