"""Evaluation: one pass over a split into one summed confusion matrix, then every metric.

``Evaluator`` is the loop that training runs every ``train.eval_every`` steps and that
`segtrain evaluate` runs on a restored model. It needs a model, a loss and the dataset's facts;
never an optimizer. The logits come from an ``Inference`` (whole images, sliding windows,
test-time augmentation) and are compared with the labels at the labels' own size: an image the
pipeline resized (``pipeline.eval_size``) has its logits resized back first.

With ``xla`` (``train.xla``) and images of one size in every batch (``pipeline.eval_size``), each
replica's forward pass compiles with XLA into one program: a smaller last batch is padded to the
full per-replica batch and the padding's logits dropped, so no batch compiles again. Mapping the
logits back to the labels stays outside XLA, since labels keep their own sizes. Sliding windows,
test-time augmentation and post-processors run without XLA.

With a post-processor (dense CRF...) each example's probabilities are also refined on the host
and counted in a second confusion matrix, so one pass reports the metrics with and without it.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from segtrain import metrics
from segtrain.data.info import DatasetInfo
from segtrain.errors import DATA_ERROR_MARKER, SegtrainError, xla_reason
from segtrain.inference import Inference
from segtrain.io import write_json
from segtrain.progress import Progress
from segtrain.task import Task


class Evaluator:
    """Runs a model over a finite batched dataset under a strategy.

    Args:
      model: the keras.Model (built under ``strategy.scope()``).
      loss_fn: per-example loss, ``loss(labels, logits) -> [B]``.
      info: the dataset's DatasetInfo.
      strategy: the tf.distribute strategy the model lives in.
      metric_names: registered metrics to compute.
      chunk: batches per tf.function call (progress is reported between calls).
      inference: how the model runs (default: whole images).
      xla: compile each replica's forward pass with XLA where every batch has one image size.
    """

    def __init__(self, model, loss_fn, info: DatasetInfo, strategy: tf.distribute.Strategy,
                 metric_names: Sequence[str] = metrics.DEFAULT_METRICS, chunk: int = 16,
                 inference: Inference | None = None, xla: bool = False):
        self.model, self.loss_fn, self.info = model, loss_fn, info
        self.strategy = strategy
        self.metric_names = tuple(metric_names)
        self.chunk = chunk
        self.inference = inference or Inference(model, info.num_classes, task=info.task)
        self.task = self.inference.task
        self.xla = xla
        self._run_chunk = tf.function(self._chunk)
        self._run_probabilities = None
        # Under MirroredStrategy only the per-replica forward pass compiles (as in training), so
        # that is what XLA gets under every strategy.
        self._compiled_logits = tf.function(self.inference.logits, jit_compile=True)
        self._xla_dataset, self._xla_batch, self._xla_told = None, 0, False

    def _logits(self, batch, full: int = 0):
        """Logits at the labels' size: resized back per example where the pipeline resized the image.

        With ``full`` (XLA), the images are padded to ``full`` examples for the compiled forward
        pass, and the padding's logits dropped.
        """
        images = batch["image"]
        if full:
            n = tf.shape(images)[0]
            padded = tf.pad(images, [[0, full - n], [0, 0], [0, 0], [0, 0]])
            logits = self._compiled_logits(tf.ensure_shape(padded, [full, *images.shape[1:]]))[:n]
        else:
            # The last batch can leave a replica no example. oneDNN's convolutions (TensorFlow's
            # CPU kernels on AVX-512) give an empty batch a wrong shape and fail: no pass there.
            empty = tf.zeros(tf.concat([[0], tf.shape(images)[1:3], [self.info.num_classes]], 0))
            logits = tf.cond(tf.shape(images)[0] > 0, lambda: self.inference.logits(images), lambda: empty)
        return fit_to_labels(logits, batch, tf.shape(batch["label"])[1:3])

    def _replica_step(self, batch, full: int = 0):
        logits = self._logits(batch, full)
        labels = batch["label"]
        cm = self.task.counts(labels, self.task.predict(logits))
        per_example = self.loss_fn(labels, logits)
        return cm, tf.reduce_sum(per_example), tf.cast(tf.shape(per_example)[0], tf.float32)

    def _chunk(self, iterator, full: int = 0):
        cm, loss_sum, count = tf.zeros(self.task.counts_shape, tf.int64), tf.constant(0.0), tf.constant(0.0)
        batches = tf.constant(0)
        for _ in tf.range(self.chunk):
            optional = iterator.get_next_as_optional()
            if not optional.has_value():
                break
            results = self.strategy.run(functools.partial(self._replica_step, full=full),
                                        args=(optional.get_value(),))
            r_cm, r_loss, r_count = (self.strategy.reduce("SUM", r, axis=None) for r in results)
            cm += r_cm
            loss_sum += r_loss
            count += r_count
            batches += 1
        return cm, loss_sum, count, batches

    def run(self, dataset: tf.data.Dataset, label: str = "eval", postprocessor=None,
            normalization=None) -> tuple[dict, np.ndarray]:
        """One pass over ``dataset``; returns ({'loss': ..., metric: ...}, confusion matrix).

        Args:
          dataset: finite batches of the evaluation pipeline.
          label: the progress line's name.
          postprocessor: a refining post-processor (segtrain.postprocess); its metrics come back
            under results['postprocessed'], with its confusion matrix.
          normalization: the pipeline's input normalisation, to give the post-processor the
            image's pixels (needed with ``postprocessor``).
        """
        if postprocessor is not None:
            return self._run_postprocessed(dataset, label, postprocessor, normalization)
        full = self._xla_batch_size(dataset)
        progress, by_image = _progress(label, dataset)
        iterator = iter(self.strategy.experimental_distribute_dataset(dataset))
        cm, loss_sum, count, done = np.zeros(self.task.counts_shape, np.int64), 0.0, 0.0, 0
        t0 = time.perf_counter()
        while True:
            r_cm, r_loss, r_count, r_batches = self._chunk_call(iterator, full, first=not done)
            cm += r_cm.numpy()
            loss_sum += float(r_loss)
            count += float(r_count)
            done += int(r_batches)
            elapsed = time.perf_counter() - t0
            progress.update(int(count) if by_image else done, count / elapsed if elapsed > 0 else None)
            if int(r_batches) < self.chunk:
                break
        progress.close()
        return self._results(label, cm, loss_sum, count), cm

    def _chunk_call(self, iterator, full: int, first: bool):
        """One call of the compiled chunk; XLA's failure to compile the model becomes one message."""
        try:
            return self._run_chunk(iterator, full)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.InternalError) as e:
            if not (first and full) or DATA_ERROR_MARKER in str(e):
                raise
            raise SegtrainError(f"XLA could not compile the evaluation of this model: {xla_reason(e.message)}. "
                                f"Evaluate without XLA (train.xla = False).") from None

    def _xla_batch_size(self, dataset: tf.data.Dataset) -> int:
        """The per-replica batch the compiled forward pass takes, or 0: no XLA for ``dataset``.

        XLA needs one image size (static in the dataset's element_spec, as ``pipeline.eval_size``
        makes it) and whole-image inference. The batch size is read from the dataset's first
        batch (the largest: only the last one is smaller) once per dataset.
        """
        if not self.xla:
            return 0
        options = self.inference.options
        shape = dataset.element_spec["image"].shape
        why = None
        if options.mode != "whole" or options.augmented:
            why = f"inference is {options.describe()}, not whole images"
        elif shape[1] is None or shape[2] is None:
            why = "its images differ in size (pipeline.eval_size gives them one)"
        if why:
            if not self._xla_told:
                print(f"Evaluation runs without XLA: {why}.")
                self._xla_told = True
            return 0
        if self._xla_dataset is not dataset:
            first = next(iter(dataset.take(1)), None)
            global_batch = 0 if first is None else int(first["image"].shape[0])
            # tf.distribute splits a global batch into per-replica parts of at most this many.
            replicas = self.strategy.num_replicas_in_sync
            self._xla_dataset, self._xla_batch = dataset, -(-global_batch // replicas)
        return self._xla_batch

    def _results(self, label, cm, loss_sum, count) -> dict:
        if not count:
            raise SegtrainError(f"{label}: the evaluation split of dataset '{self.info.name}' is empty.")
        results = {"loss": loss_sum / count}
        results.update(metrics.compute(cm, self.metric_names))
        return results

    def _replica_probabilities(self, batch):
        logits = self.inference.logits(batch["image"])
        labels = batch["label"]
        loss = self.loss_fn(labels, fit_to_labels(logits, batch, tf.shape(labels)[1:3]))
        return self.task.probabilities(logits), labels, batch["image"], batch["image_size"], batch["label_size"], loss

    def _run_postprocessed(self, dataset, label, postprocessor, normalization):
        """The pass with a host-side post-processor: probabilities come back per replica, each
        example is refined at the size the model saw, and both predictions are counted at the
        label's size."""
        if normalization is None:
            raise ValueError("a post-processor needs the pipeline's normalization to see the image")
        if self.task.multilabel:
            raise SegtrainError(f"Dataset '{self.info.name}' is multi-label: the post-processors refine one class "
                                f"per pixel (a softmax); evaluate without --postprocess.")
        if not self.info.rgb:
            raise SegtrainError(f"Dataset '{self.info.name}' has images of {self.info.channels} band(s) of "
                                f"{self.info.image_dtype}: the post-processors look at RGB images; evaluate without "
                                f"--postprocess.")
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise SegtrainError("Evaluation with a post-processor runs on one machine: run `segtrain evaluate "
                                "--postprocess=...` outside the cluster.")
        if self._run_probabilities is None:
            self._run_probabilities = tf.function(
                lambda b: self.strategy.run(self._replica_probabilities, args=(b,)), reduce_retracing=True)
        progress, by_image = _progress(label, dataset)
        c = self.info.num_classes
        cm, cm_post = np.zeros([c, c], np.int64), np.zeros([c, c], np.int64)  # one class per pixel (checked above)
        loss_sum, count, done, t0 = 0.0, 0.0, 0, time.perf_counter()
        for batch in self.strategy.experimental_distribute_dataset(dataset):
            outputs = self._run_probabilities(batch)
            for probs, labels, images, image_sizes, label_sizes, loss in zip(
                    *(self.strategy.experimental_local_results(o) for o in outputs)):
                loss_sum += float(tf.reduce_sum(loss))
                count += int(loss.shape[0])
                for i in range(int(probs.shape[0])):
                    (ih, iw), (lh, lw) = image_sizes[i].numpy(), label_sizes[i].numpy()
                    p = probs[i, :ih, :iw].numpy()
                    refined = postprocessor(normalization.invert(images[i, :ih, :iw]), p)["probabilities"]
                    truth = labels[i, :lh, :lw].numpy()
                    for matrix, q in ((cm, p), (cm_post, refined)):
                        if (ih, iw) != (lh, lw):
                            q = tf.image.resize(q, (lh, lw), method="bilinear").numpy()
                        matrix += metrics.confusion_matrix(truth, np.argmax(q, -1), c, self.info.ignore_label).numpy()
            done += 1
            elapsed = time.perf_counter() - t0
            progress.update(int(count) if by_image else done, count / elapsed if elapsed > 0 else None)
        progress.close()
        results = self._results(label, cm, loss_sum, count)
        post = metrics.compute(cm_post, self.metric_names)
        post["confusion_matrix"] = cm_post.tolist()
        results["postprocessed"] = post
        return results, cm


def evaluate_exported(exported, dataset: tf.data.Dataset, info: DatasetInfo, loss_fn, normalization,
                      metric_names: Sequence[str] = metrics.DEFAULT_METRICS, label: str = "eval",
                      task: Task | None = None) -> tuple[dict, np.ndarray]:
    """One pass over ``dataset`` with an exported model; returns ({'loss': ..., metric: ...}, confusion matrix).

    The export gets what a client would send: each example's image, cropped to its own size and
    turned back into uint8 RGB (``normalization.invert``), alone or with the examples of its batch
    that share its size. Its logits are then scored exactly as a checkpoint's are: mapped onto the
    label (``fit_to_labels``), counted in one confusion matrix, the run's loss averaged.

    Args:
      exported: a callable ``logits(uint8 [B,H,W,3]) -> float32 [B,H,W,C]`` (an Exported's ``logits``).
      dataset: finite batches of the evaluation pipeline (one process, no strategy).
      info: the dataset's facts.
      loss_fn: per-example loss, ``loss(labels, logits) -> [B]``.
      normalization: the pipeline's input normalisation (inverted to give the export its pixels).
      metric_names: registered metrics to compute.
      label: the progress line's name.
      task: what the logits mean (default: the dataset's, threshold 0.5): the export's own.
    """
    progress, by_image = _progress(label, dataset)
    task = task or info.task
    cm, loss_sum, count, done, t0 = np.zeros(task.counts_shape, np.int64), 0.0, 0.0, 0, time.perf_counter()
    for batch in dataset:
        image_sizes, label_sizes = batch["image_size"].numpy(), batch["label_size"].numpy()
        labels = batch["label"]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(image_sizes):
            groups.setdefault((int(h), int(w)), []).append(i)
        for (h, w), members in groups.items():
            pixels = np.stack([normalization.invert(batch["image"][i, :h, :w]) for i in members])
            logits = tf.constant(np.asarray(exported(pixels), np.float32))
            group_labels = tf.gather(labels, members)
            fitted = fit_to_labels(logits, {"image_size": image_sizes[members], "label_size": label_sizes[members]},
                                   tf.shape(group_labels)[1:3])
            cm += task.counts(group_labels, task.predict(fitted)).numpy()
            loss_sum += float(tf.reduce_sum(loss_fn(group_labels, fitted)))
            count += len(members)
        done += 1
        elapsed = time.perf_counter() - t0
        progress.update(int(count) if by_image else done, count / elapsed if elapsed > 0 else None)
    progress.close()
    if not count:
        raise SegtrainError(f"{label}: the evaluation split of dataset '{info.name}' is empty.")
    results = {"loss": loss_sum / count}
    results.update(metrics.compute(cm, metric_names))
    return results, cm


def fit_to_labels(logits: tf.Tensor, batch: dict, label_shape: tf.Tensor) -> tf.Tensor:
    """``logits`` of a batch mapped onto its labels' (padded) grid.

    Where image and label share a size (no ``pipeline.eval_size``), the logits are already there.
    Otherwise each example's logits are cropped to its image, resized (bilinear) to its label's
    size and padded to the batch's label shape.
    """
    if "image_size" not in batch or "label_size" not in batch:
        return logits
    num_classes = logits.shape[-1]

    def one(args):
        example, image_size, label_size = args
        example = example[: image_size[0], : image_size[1]]
        example = tf.image.resize(example, label_size, method="bilinear")
        return tf.pad(example, [[0, label_shape[0] - label_size[0]], [0, label_shape[1] - label_size[1]], [0, 0]])

    def resized():
        return tf.map_fn(one, (logits, batch["image_size"], batch["label_size"]),
                         fn_output_signature=tf.TensorSpec([None, None, num_classes], tf.float32))

    same = tf.reduce_all(tf.equal(tf.shape(logits)[1:3], label_shape))
    return tf.cond(same, lambda: logits, resized)


def format_table(results: dict, class_names: Sequence[str], postprocessed: dict | None = None,
                 postprocess_name: str | None = None) -> str:
    """The metrics as a plain-text table, per-class values one row per class; with
    ``postprocessed`` results, a second column of each metric after the post-processor."""
    lines = []
    skip = ("confusion_matrix", "per_class", "postprocessed")
    scalars = {k: v for k, v in results.items() if not isinstance(v, (list, tuple, dict)) and k not in skip}
    vectors = {k: v for k, v in results.items() if isinstance(v, (list, tuple)) and k not in skip}
    post = postprocessed or {}
    width = max([len(k) for k in scalars] + [len(n) for n in class_names] + [10])
    if post:
        name = postprocess_name or "postprocessed"
        lines.append(f"{'':<{width}}  {'model':>10}  {'+ ' + name:>14}")
    for key, value in scalars.items():
        extra = f"  {_fmt(post[key]):>14}" if key in post else ""
        lines.append(f"{key:<{width}}  {_fmt(value):>10}{extra}" if post else f"{key:<{width}}  {_fmt(value)}")
    if vectors:
        columns = [(k, v) for k, v in vectors.items()]
        columns += [(f"{k} +post", post[k]) for k in vectors if isinstance(post.get(k), (list, tuple))]
        lines.append("")
        lines.append(f"{'class':<{width}}  " + "  ".join(f"{k:>14}" for k, _ in columns))
        for i, name in enumerate(class_names):
            lines.append(f"{name:<{width}}  " + "  ".join(f"{_fmt(v[i]):>14}" for _, v in columns))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def json_ready(results: dict) -> dict:
    """NaN (a class never seen) becomes null: JSON has no NaN."""

    def clean(v):
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):  # nested results (the failure views, a post-processor's)
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return {k: clean(v) for k, v in results.items()}


def _progress(label: str, dataset: tf.data.Dataset) -> tuple[Progress, bool]:
    """The pass's progress line, and whether it counts images: by batches when their number is
    known, else by the images the pipeline says the split has (batches of one image size)."""
    num_batches = int(dataset.cardinality())
    examples = getattr(dataset, "num_examples", None)
    if num_batches <= 0 and examples:
        return Progress(label, examples, unit="image"), True
    return Progress(label, num_batches if num_batches > 0 else None, unit="batch"), False


def per_class(results: dict, class_names: Sequence[str]) -> dict:
    """{class name: {metric: value}} of the per-class metrics in ``results``."""
    vectors = {k.removeprefix("per_class_"): v for k, v in results.items()
               if k.startswith("per_class_") and isinstance(v, (list, tuple, np.ndarray))}
    return {name: {k: v[i] for k, v in vectors.items()} for i, name in enumerate(class_names)}


def results_record(results: dict, cm: np.ndarray, class_names: Sequence[str], split: str, step: int,
                   inference: str, checkpoint: str | None = None) -> dict:
    """The one layout of an evaluation's results file, in-run (eval_results_<split>.json) and
    from `segtrain evaluate` (eval_results.json): every metric, the split, the training step,
    the checkpoint (None: the model in training), how the model ran, per-class values by class
    name and the confusion matrix (rows: ground truth)."""
    names = list(class_names)
    return {**results, "split": split, "step": step, "checkpoint": checkpoint, "inference": inference,
            "class_names": names, "per_class": per_class(results, names), "confusion_matrix": np.asarray(cm).tolist()}


def write_results(path: str, results: dict) -> None:
    write_json(path, json_ready(results))
