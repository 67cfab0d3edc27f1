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


def _np_reference(labels, preds):
    valid = labels != IGNORE
    l, p = labels[valid], preds[valid]
    classes_seen = [c for c in range(C) if (l == c).any() or (p == c).any()]
    iou = {c: ((l == c) & (p == c)).sum() / ((l == c) | (p == c)).sum() for c in classes_seen}
    acc = {c: (((l == c) & (p == c)).sum() / (l == c).sum()) if (l == c).any() else 0.0 for c in classes_seen}
    f1 = {c: 2 * ((l == c) & (p == c)).sum() / ((l == c).sum() + (p == c).sum()) for c in classes_seen}
    return {
        "pixel_accuracy": (l == p).mean(),
        "mean_accuracy": np.mean(list(acc.values())),
        "mean_iou": np.mean(list(iou.values())),
        "dice": np.mean(list(f1.values())),
        "per_class_iou": [iou.get(c, np.nan) for c in range(C)],
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
    ref = _np_reference(labels, preds)
    for name in ("pixel_accuracy", "mean_accuracy", "mean_iou", "dice"):
        assert METRICS.get(name)(cm).numpy() == pytest.approx(ref[name], rel=1e-9), name
    np.testing.assert_allclose(METRICS.get("per_class_iou")(cm).numpy(), ref["per_class_iou"], rtol=1e-9)
    assert np.isnan(METRICS.get("per_class_iou")(cm).numpy()[4])


def test_perfect_and_empty():
    cm = np.diag([10, 0, 5])
    assert float(METRICS.get("mean_iou")(cm)) == 1.0  # class 1 never seen: not counted
    assert float(METRICS.get("mean_accuracy")(cm)) == 1.0
    assert np.isnan(float(METRICS.get("mean_iou")(np.zeros((3, 3)))))


def test_compute_returns_plain_python():
    results = M.compute(np.diag([3, 1]) + 1)
    assert isinstance(results["mean_iou"], float)
    assert isinstance(results["per_class_iou"], list) and len(results["per_class_iou"]) == 2
