"""The actions a training run calls at window ends (see segtrain.train.loop).

Each is small and testable alone with a hand-made ``Window``. The trainer puts them in this
order: non-finite check, training summaries, progress line, preemption
(segtrain.train.preemption), checkpoint, evaluation, evaluation summaries, image panels, the
trackers (segtrain.train.trackers), best checkpoint, early stopping, a tuning trial's reports
(segtrain.train.pruning). Later actions read what earlier ones
added to the window (the evaluation's results).
"""

from __future__ import annotations

import os
from typing import Sequence

import gin
import numpy as np
import tensorflow as tf

from segtrain import progress as progress_line
from segtrain import run_dir
from segtrain.data.info import DatasetInfo
from segtrain.data.transforms import Normalization
from segtrain.errors import SegtrainError
from segtrain.evaluation import Evaluator, fit_to_labels, format_table, results_record, write_results
from segtrain.inference import Inference
from segtrain.io import atomic_write_text, read_json, write_json
from segtrain.train import summaries
from segtrain.train.checkpoints import Checkpoints
from segtrain.train.loop import Action, Rewind, Window, due


class OnNonFinite(Action):
    """What a NaN or infinite loss does (``train.on_nan``): stop, or restore and go on.

    'stop': an error naming the step; the last good checkpoint stays the latest.
    'restore': reload the latest checkpoint (weights, optimizer, step), multiply the learning
    rate by ``factor``, and go on from there with the batches that come next, so the batch
    that diverged is not seen again at that point; at most ``max_restores`` times per run (the
    count survives a restart: ``nan_restores.json``), then stop as 'stop' does. Every restore is
    printed and written to TensorBoard (``train/nan_restores``, and a text entry).

    Args:
      checkpoints: the run's checkpoints.
      policy: 'stop' or 'restore'.
      max_restores, factor: train.max_nan_restores, train.nan_lr_factor.
      restore: ``restore(path, lr_factor) -> step`` loads checkpoint ``path`` and sets the
        learning-rate factor (the trainer's).
      writer: the training summary writer.
      record_path: where the restores are recorded (read by every worker, written by the chief).
      chief: whether this process writes the record.
    """

    TAG = "nan_restores"

    def __init__(self, checkpoints: Checkpoints, policy: str = "stop", max_restores: int = 0, factor: float = 1.0,
                 restore=None, writer=None, record_path: str | None = None, chief: bool = True):
        self.checkpoints, self.policy, self.max_restores, self.factor = checkpoints, policy, max_restores, factor
        self.restore, self.writer, self.record_path, self.chief = restore, writer, record_path, chief
        self.events: list[dict] = []
        if record_path and os.path.exists(record_path):
            self.events = list(read_json(record_path).get("restores", []))

    @property
    def lr_factor(self) -> float:
        """The learning-rate factor after the restores so far."""
        return self.factor ** len(self.events)

    def start(self, step: int) -> None:
        # A NaN before the first save has a checkpoint to go back to: the start.
        if self.policy == "restore" and self.checkpoints.latest_checkpoint is None:
            self.checkpoints.save(step)

    def __call__(self, window: Window) -> None:
        bad = np.flatnonzero(~np.isfinite(window.losses))
        if not bad.size:
            return
        step = window.step - window.steps + int(bad[0]) + 1
        what = f"The loss became {window.losses[bad[0]]} at step {step}."
        latest = self.checkpoints.latest_checkpoint
        if self.policy != "restore":
            raise SegtrainError(f"{what} {self.checkpoints.kept()}")
        if len(self.events) >= self.max_restores or latest is None:
            raise SegtrainError(
                f"{what} The run has restored {len(self.events)} time(s) already (train.max_nan_restores="
                f"{self.max_restores}). {self.checkpoints.kept()}")
        factor = self.factor ** (len(self.events) + 1)
        restored = self.restore(latest, factor)
        self.events.append({"step": step, "loss": str(window.losses[bad[0]]), "restored": os.path.basename(latest),
                            "restored_step": restored, "lr_factor": factor})
        progress_line.end_line()
        print(f"{what} Restoring {os.path.basename(latest)} (step {restored}), learning rate x{factor:g}, and "
              f"going on with the next batches (restore {len(self.events)} of at most {self.max_restores}).",
              flush=True)
        if self.chief and self.record_path:
            write_json(self.record_path, {"restores": self.events})
        if self.writer is not None:
            summaries.write_scalars(self.writer, {self.TAG: len(self.events)}, step)
            summaries.write_text(self.writer, self.TAG, f"Loss {self.events[-1]['loss']} at step {step}: restored "
                         f"{self.events[-1]['restored']}, learning rate x{factor:g}.", step)
        raise Rewind(restored)


class TrainSummaries(Action):
    """The window's training scalars in TensorBoard (``train/``).

    When the run goes back to a checkpoint (``rewind``), what ``train/`` holds after its step goes,
    but the NaN restores themselves: the steps are trained, and summarised, again.
    """

    def __init__(self, writer: summaries.EventWriter):
        self.writer = writer

    def __call__(self, window: Window) -> None:
        summaries.write_scalars(self.writer, window.scalars, window.step)

    def rewind(self, step: int) -> None:
        self.writer.rewind(step, keep=(OnNonFinite.TAG,))


class ProgressLine(Action):
    """The console line: step, loss, learning rate, images/s, ETA."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.progress: progress_line.Progress | None = None

    def start(self, step: int) -> None:
        self.progress = progress_line.Progress("train", self.num_steps, start=step)

    def __call__(self, window: Window) -> None:
        self.progress.update(window.step, window.images_per_second, loss=window.scalars["loss"],
                             lr=window.scalars["learning_rate"])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


class SaveCheckpoints(Action):
    """Saves the latest checkpoint every ``every`` steps, and where the run ends."""

    def __init__(self, checkpoints: Checkpoints, every: int):
        self.checkpoints, self.every = checkpoints, every
        self.saved: int | None = None

    def start(self, step: int) -> None:
        self.saved = step  # restored from (or nothing yet to save)

    def rewind(self, step: int) -> None:
        self.saved = step

    def __call__(self, window: Window) -> None:
        if due(window, self.every):
            self.checkpoints.save(window.step)
            self.saved = window.step

    def end(self, step: int) -> None:
        if self.saved != step:  # a stop between saves
            self.checkpoints.save(step)
            self.saved = step


class Evaluate(Action):
    """Evaluates every ``every`` steps (and at the end); puts (results, confusion matrix) on the window.

    At the end of the run, prints the last results as a table and writes them to
    ``results_path`` (on the chief).
    """

    def __init__(self, evaluator: Evaluator, dataset: tf.data.Dataset, every: int | None, results_path: str,
                 split: str, chief: bool = True):
        self.evaluator, self.dataset, self.every = evaluator, dataset, every
        self.results_path, self.split, self.chief = results_path, split, chief
        self.results: dict = {}
        self.cm: np.ndarray | None = None
        self.step: int | None = None

    def __call__(self, window: Window) -> None:
        if not due(window, self.every):
            return
        progress_line.end_line()
        results, cm = self.evaluator.run(self.dataset)
        print(f"eval step {window.step}: " + "  ".join(
            f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float)))
        window.eval = (results, cm)
        self.results, self.cm, self.step = results, cm, window.step

    def end(self, step: int) -> None:
        if not self.results:
            return
        if self.chief:
            write_results(self.results_path, results_record(
                self.results, self.cm, self.evaluator.info.class_names, self.split, self.step,
                self.evaluator.inference.options.describe()))
        print(format_table(self.results, self.evaluator.info.class_names))


class EvalSummaries(Action):
    """Every evaluation in TensorBoard (``eval/``): scalars, per-class values, confusion matrix
    (and, at ``rewind``, what ``eval/`` holds after the step the run goes back to)."""

    def __init__(self, writer: summaries.EventWriter, class_names: Sequence[str]):
        self.writer, self.class_names = writer, class_names

    def rewind(self, step: int) -> None:
        self.writer.rewind(step)

    def __call__(self, window: Window) -> None:
        if window.eval is None:
            return
        results, cm = window.eval
        summaries.write_scalars(self.writer, results, window.step, self.class_names)
        summaries.write_images(self.writer, "confusion_matrix", [summaries.confusion_image(cm)], window.step)
        summaries.write_text(self.writer, "confusion_matrix", summaries.confusion_markdown(cm, self.class_names), window.step)


class ImagePanels(Action):
    """At every evaluation, ``count`` examples as input | truth | prediction | overlay panels.

    The prediction comes from ``inference``, the evaluation's own (sliding windows, test-time
    scales and flips as ``inference.*`` says): the panels show what was measured.
    """

    def __init__(self, writer, dataset: tf.data.Dataset, inference: Inference, info: DatasetInfo,
                 normalization: Normalization, count: int):
        self.writer, self.dataset, self.inference = writer, dataset, inference
        self.info, self.normalization, self.count = info, normalization, count

    def __call__(self, window: Window) -> None:
        if window.eval is None or not self.count:
            return
        panels = []
        for batch in self.dataset.unbatch().take(self.count).batch(1):
            logits = tf.cast(self.inference.logits(batch["image"]), tf.float32)
            label = batch["label"][0].numpy()
            prediction = self.inference.task.predict(
                fit_to_labels(logits, batch, tf.shape(batch["label"])[1:3])).numpy()[0]
            image = batch["image"][0]
            if "image_size" in batch and image.shape[:2] != label.shape:  # pipeline.eval_size resized it
                h, w = batch["image_size"][0].numpy()
                image = tf.image.resize(image[:h, :w], label.shape, method="bilinear")
            panels.append(summaries.panel(self.normalization.display(image), label, prediction, self.info))
        summaries.write_images(self.writer, "examples", panels, window.step)
        window.images["examples"] = panels


class KeepBest(Action):
    """Keeps the checkpoint of the best evaluation of ``metric`` (model_dir/best/), and a record.

    The record (best.json) also counts the evaluations since the metric last improved, so early
    stopping survives a restart. A record of another metric or mode starts afresh.
    """

    def __init__(self, checkpoints: Checkpoints, metric: str, mode: str, min_delta: float = 0.0):
        self.checkpoints, self.metric, self.mode, self.min_delta = checkpoints, metric, mode, min_delta
        self.record = self._load()

    def _load(self) -> dict:
        fresh = {"metric": self.metric, "mode": self.mode, "value": None, "step": None,
                 "evaluations_without_improvement": 0}
        record = self.checkpoints.best_record()
        if record is None:
            return fresh
        if (record.get("metric"), record.get("mode")) != (self.metric, self.mode):
            print(f"The best checkpoint so far was chosen by {record.get('metric')} "
                  f"({record.get('mode')}); now by {self.metric} ({self.mode}): starting a new record.")
            return fresh
        return {**fresh, **record}

    @property
    def stale(self) -> int:
        """Evaluations since the metric last improved."""
        return self.record["evaluations_without_improvement"]

    def __call__(self, window: Window) -> None:
        if window.eval is None:
            return
        value = float(window.eval[0][self.metric])
        if improved(value, self.record["value"], self.mode, self.min_delta):
            path = self.checkpoints.save_best(window.step)
            self.record = {**self.record, "value": value, "step": window.step, "path": os.path.basename(path),
                           "evaluations_without_improvement": 0}
        else:
            self.record = {**self.record, "evaluations_without_improvement": self.stale + 1}
        self.checkpoints.write_record(self.record)


class EarlyStopping(Action):
    """Stops the run after ``patience`` evaluations without improvement of the best's metric."""

    def __init__(self, best: KeepBest, patience: int):
        self.best, self.patience = best, patience

    def stopped(self) -> bool:
        """Whether the run had already stopped early (a restarted job must not go on)."""
        return bool(self.patience) and self.best.stale >= self.patience

    def __call__(self, window: Window) -> bool:
        if window.eval is None or not self.stopped():
            return False
        record = self.best.record
        print(f"Early stopping at step {window.step}: {self.best.metric} has not improved for "
              f"{self.best.stale} evaluations (best {record['value']} at step {record['step']}).")
        return True


class WriteConfig(Action):
    """Writes the operative gin config (every setting the run used) to model_dir and TensorBoard.

    At the start, after model, data, loss and optimizer are built: gin lists only what was called.
    """

    TAG = "config/operative_gin"

    def __init__(self, model_dir: str, writer):
        self.model_dir, self.writer = model_dir, writer

    def start(self, step: int) -> None:
        config = gin.operative_config_str()
        atomic_write_text(os.path.join(self.model_dir, run_dir.OPERATIVE_CONFIG), config)
        summaries.write_text(self.writer, self.TAG, summaries.gin_markdown(config), step)


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (a first finite value does)."""
    if not np.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta
