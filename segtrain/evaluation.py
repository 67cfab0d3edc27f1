"""Evaluation: one pass over a split into one summed confusion matrix, then every metric.

``Evaluator`` is the loop that training runs every ``train.eval_every`` steps and that
`segtrain evaluate` runs on a restored model. It needs a model, a loss and the dataset's facts;
never an optimizer.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from segtrain import metrics as M
from segtrain.data.info import DatasetInfo
from segtrain.errors import SegtrainError
from segtrain.io import write_json
from segtrain.progress import Progress


class Evaluator:
    """Runs a model over a finite batched dataset under a strategy.

    Args:
      model: the keras.Model (built under ``strategy.scope()``).
      loss_fn: per-example loss, ``loss(labels, logits) -> [B]``.
      info: the dataset's DatasetInfo.
      strategy: the tf.distribute strategy the model lives in.
      metric_names: registered metrics to compute.
      chunk: batches per tf.function call (progress is reported between calls).
    """

    def __init__(self, model, loss_fn, info: DatasetInfo, strategy: tf.distribute.Strategy,
                 metric_names: Sequence[str] = M.DEFAULT_METRICS, chunk: int = 16):
        self.model, self.loss_fn, self.info = model, loss_fn, info
        self.strategy = strategy
        self.metric_names = tuple(metric_names)
        self.chunk = chunk
        self._run_chunk = tf.function(self._chunk)

    def _replica_step(self, batch):
        logits = self.model(batch["image"], training=False)
        labels = batch["label"]
        cm = M.confusion_matrix(labels, tf.argmax(logits, -1), self.info.num_classes, self.info.ignore_label)
        per_example = self.loss_fn(labels, logits)
        return cm, tf.reduce_sum(per_example), tf.cast(tf.shape(per_example)[0], tf.float32)

    def _chunk(self, iterator):
        c = self.info.num_classes
        cm, loss_sum, count = tf.zeros([c, c], tf.int64), tf.constant(0.0), tf.constant(0.0)
        batches = tf.constant(0)
        for _ in tf.range(self.chunk):
            optional = iterator.get_next_as_optional()
            if not optional.has_value():
                break
            results = self.strategy.run(self._replica_step, args=(optional.get_value(),))
            r_cm, r_loss, r_count = (self.strategy.reduce("SUM", r, axis=None) for r in results)
            cm += r_cm
            loss_sum += r_loss
            count += r_count
            batches += 1
        return cm, loss_sum, count, batches

    def run(self, dataset: tf.data.Dataset, label: str = "eval") -> tuple[dict, np.ndarray]:
        """One pass over ``dataset``; returns ({'loss': ..., metric: ...}, confusion matrix)."""
        num_batches = int(dataset.cardinality())
        progress = Progress(label, num_batches if num_batches > 0 else None, unit="batch")
        iterator = iter(self.strategy.experimental_distribute_dataset(dataset))
        c = self.info.num_classes
        cm, loss_sum, count, done = np.zeros([c, c], np.int64), 0.0, 0.0, 0
        t0 = time.perf_counter()
        while True:
            r_cm, r_loss, r_count, r_batches = self._run_chunk(iterator)
            cm += r_cm.numpy()
            loss_sum += float(r_loss)
            count += float(r_count)
            done += int(r_batches)
            elapsed = time.perf_counter() - t0
            progress.update(done, count / elapsed if elapsed > 0 else None)
            if int(r_batches) < self.chunk:
                break
        progress.close()
        if not count:
            raise SegtrainError(f"{label}: the evaluation split of dataset '{self.info.name}' is empty.")
        results = {"loss": loss_sum / count}
        results.update(M.compute(cm, self.metric_names))
        return results, cm


def format_table(results: dict, class_names: Sequence[str]) -> str:
    """The metrics as a plain-text table, per-class values one row per class."""
    lines = []
    scalars = {k: v for k, v in results.items() if not isinstance(v, (list, tuple))}
    vectors = {k: v for k, v in results.items() if isinstance(v, (list, tuple))}
    width = max([len(k) for k in scalars] + [len(n) for n in class_names] + [10])
    for key, value in scalars.items():
        lines.append(f"{key:<{width}}  {_fmt(value)}")
    if vectors:
        lines.append("")
        lines.append(f"{'class':<{width}}  " + "  ".join(f"{k:>14}" for k in vectors))
        for i, name in enumerate(class_names):
            lines.append(f"{name:<{width}}  " + "  ".join(f"{_fmt(v[i]):>14}" for v in vectors.values()))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def json_ready(results: dict) -> dict:
    """NaN (a class never seen) becomes null: JSON has no NaN."""

    def clean(v):
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return {k: clean(v) for k, v in results.items()}


def write_results(path: str, results: dict) -> None:
    write_json(path, json_ready(results))
