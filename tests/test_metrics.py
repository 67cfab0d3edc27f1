"""Metrics from one confusion matrix, checked against independent NumPy computations."""

from __future__ import annotations

import numpy as np
import pytest

from registry import METRICS
from segtrain import metrics as M

C, IGNORE = 5, 255


def _random(seed, n=4000):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, size=n)
    preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, C, size=n))
    labels[rng.random(n) < 0.15] = IGNORE
    # Class 4 absent from both ground truth and prediction; class 3 only predicted.
    labels[labels == 4] = 0
    preds[preds == 4] = 1
    labels[labels == 3] = 2
    return labels, preds


def _mmseg_reference(labels, preds):
    """MMSegmentation's definitions (IoUMetric.intersect_and_union and total_area_to_metrics),
    computed independently in NumPy: histograms of the valid pixels, then per-class ratios in
    which 0/0 is NaN, and means that skip NaN."""
    valid = labels != IGNORE
    l, p = labels[valid], preds[valid]
    bins = np.arange(C + 1)
    intersect = np.histogram(p[p == l], bins)[0].astype(float)
    area_pred = np.histogram(p, bins)[0].astype(float)
    area_label = np.histogram(l, bins)[0].astype(float)
    union = area_pred + area_label - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou, acc, dice = intersect / union, intersect / area_label, 2 * intersect / (area_pred + area_label)
        return {
            "pixel_accuracy": intersect.sum() / area_label.sum(),
            "mean_accuracy": np.nanmean(acc),
            "mean_iou": np.nanmean(iou),
            "dice": np.nanmean(dice),
            "per_class_iou": iou,
            "per_class_accuracy": acc,
            "per_class_dice": dice,
        }


def test_confusion_matrix_counts_and_excludes_ignore():
    labels, preds = _random(0)
    cm = M.confusion_matrix(labels.reshape(40, 100), preds.reshape(40, 100), C, IGNORE).numpy()
    expected = np.zeros((C, C), np.int64)
    for l, p in zip(labels, preds):
        if l != IGNORE:
            expected[l, p] += 1
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_numpy_on_summed_batches(seed):
    labels, preds = _random(seed)
    # Streaming: summing per-batch matrices equals one matrix of everything.
    cm = sum(
        M.confusion_matrix(labels[i : i + 1000], preds[i : i + 1000], C, IGNORE).numpy()
        for i in range(0, labels.size, 1000)
    )
    ref = _mmseg_reference(labels, preds)
    for name in ("pixel_accuracy", "mean_accuracy", "mean_iou", "dice"):
        assert METRICS.get(name)(cm).numpy() == pytest.approx(ref[name], rel=1e-9), name
    for name in ("per_class_iou", "per_class_accuracy", "per_class_dice"):
        np.testing.assert_allclose(METRICS.get(name)(cm).numpy(), ref[name], rtol=1e-9, err_msg=name)
    per_class = {name: METRICS.get(name)(cm).numpy() for name in ("per_class_iou", "per_class_accuracy",
                                                                  "per_class_dice")}
    # Class 4 is nowhere: no value. Class 3 is only predicted: no recall, but IoU and Dice 0.
    assert all(np.isnan(v[4]) for v in per_class.values())
    assert np.isnan(per_class["per_class_accuracy"][3])
    assert per_class["per_class_iou"][3] == 0 and per_class["per_class_dice"][3] == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_confusion_matrices_match_mmsegmentation(seed):
    """Random matrices with absent, prediction-only, never-predicted and ignored classes."""
    rng = np.random.default_rng(100 + seed)
    classes = int(rng.integers(2, 8))
    cm = rng.integers(0, 50, size=(classes, classes)) * (rng.random((classes, classes)) < 0.7)
    absent, predicted_only, never_predicted = rng.choice(classes, 3, replace=classes < 3)
    cm[absent, :] = 0
    cm[:, absent] = 0
    cm[predicted_only, :] = 0
    cm[never_predicted, :] += 1
    cm[:, never_predicted] = 0
    cm[never_predicted, never_predicted] = 0
    # The same counts as pixels, plus ignored pixels, through MMSegmentation's definitions.
    labels = np.repeat(np.repeat(np.arange(classes), classes), cm.ravel())
    preds = np.repeat(np.tile(np.arange(classes), classes), cm.ravel())
    labels = np.concatenate([labels, np.full(37, IGNORE)])
    preds = np.concatenate([preds, rng.integers(0, classes, 37)])
    global C
    saved, C = C, classes
    try:
        ref = _mmseg_reference(labels, preds)
    finally:
        C = saved
    counted = M.confusion_matrix(labels, preds, classes, IGNORE).numpy()
    np.testing.assert_array_equal(counted, cm)
    for name, expected in ref.items():
        value = METRICS.get(name)(counted).numpy()
        np.testing.assert_allclose(value, expected, rtol=1e-9, err_msg=name)


def test_perfect_and_empty():
    cm = np.diag([10, 0, 5])
    assert float(METRICS.get("mean_iou")(cm)) == 1.0  # class 1 never seen: not counted
    assert float(METRICS.get("mean_accuracy")(cm)) == 1.0
    # Class 2 predicted where there is none: mean IoU and Dice fall, mean accuracy does not.
    cm = np.array([[10, 0, 2], [0, 5, 0], [0, 0, 0]])
    assert float(METRICS.get("mean_accuracy")(cm)) == pytest.approx((10 / 12 + 1) / 2)
    assert float(METRICS.get("mean_iou")(cm)) == pytest.approx((10 / 12 + 1 + 0) / 3)
    assert np.isnan(float(METRICS.get("mean_iou")(np.zeros((3, 3)))))


def test_compute_returns_plain_python():
    results = M.compute(np.diag([3, 1]) + 1)
    assert isinstance(results["mean_iou"], float)
    assert isinstance(results["per_class_iou"], list) and len(results["per_class_iou"]) == 2
