"""Each action alone, on hand-made windows, with stand-ins for checkpoints and evaluation."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import tensorflow as tf

from segtrain.data.info import DatasetInfo
from segtrain.inference import Inference
from segtrain.data.transforms import Normalization
from segtrain.errors import SegtrainError
from segtrain.train import actions as A
from segtrain.train.loop import Window
from tests.conftest import read_scalars, read_tags


def _window(step, steps=2, losses=None, last=False, results=None):
    losses = np.zeros(steps, np.float32) if losses is None else np.asarray(losses, np.float32)
    window = Window(step, steps, losses, {"loss": float(losses.mean()), "learning_rate": 0.1}, 10.0, last=last)
    if results is not None:
        window.eval = (results, np.eye(2, dtype=np.int64))
    return window


class FakeCheckpoints:
    def __init__(self, record=None):
        self.saved, self.best_saved, self.records, self._record = [], [], [], record

    def save(self, step):
        self.saved.append(step)

    def save_best(self, step):
        self.best_saved.append(step)
        return f"/run/best/ckpt-{step}"

    def best_record(self):
        return self._record

    def write_record(self, record):
        self.records.append(record)

    latest_checkpoint = "/run/ckpt-4"

    def kept(self):
        return "The last good checkpoint, ckpt-4, is intact; ..."


def test_stop_on_non_finite_names_the_step():
    action = A.OnNonFinite(FakeCheckpoints())
    action(_window(6, steps=3, losses=[1.0, 0.5, 0.4]))
    with pytest.raises(SegtrainError, match=r"The loss became nan at step 8\. The last good checkpoint, ckpt-4"):
        action(_window(9, steps=3, losses=[0.3, np.nan, np.inf]))


def test_restore_on_non_finite_rewinds_the_loop_and_is_bounded(tmp_path):
    from segtrain.train.loop import Rewind

    restored = []
    action = A.OnNonFinite(FakeCheckpoints(), "restore", max_restores=2, factor=0.5,
                           restore=lambda path, factor: restored.append((path, factor)) or 4,
                           record_path=str(tmp_path / "nan_restores.json"))
    for expected in (0.5, 0.25):
        with pytest.raises(Rewind) as rewind:
            action(_window(6, losses=[np.nan, 1.0]))
        assert rewind.value.step == 4 and restored[-1] == ("/run/ckpt-4", expected)
    with pytest.raises(SegtrainError, match=r"at step 5\. The run has restored 2 time\(s\) already"):
        action(_window(6, losses=[np.inf, 1.0]))
    # A restarted run counts the restores recorded so far.
    again = A.OnNonFinite(FakeCheckpoints(), "restore", 2, 0.5, record_path=str(tmp_path / "nan_restores.json"))
    assert again.lr_factor == 0.25 and len(again.events) == 2


def test_save_checkpoints_at_its_interval_at_the_last_step_and_at_a_stop():
    checkpoints = FakeCheckpoints()
    action = A.SaveCheckpoints(checkpoints, every=4)
    action.start(0)
    for step in (2, 4, 6):
        action(_window(step))
    action.end(6)  # the run stopped early at 6: that step is saved too
    action(_window(9, last=True))
    action.end(9)  # already saved at the last window
    assert checkpoints.saved == [4, 6, 9]
    resumed = A.SaveCheckpoints(FakeCheckpoints(), every=4)
    resumed.start(8)
    resumed.end(8)  # nothing trained since the restore: nothing to save
    assert resumed.checkpoints.saved == []


def test_evaluate_when_due_and_hand_the_results_on(tmp_path, capsys):
    runs = []

    class FakeEvaluator:
        info = DatasetInfo(num_classes=2, class_names=("bg", "fg"))
        inference = types.SimpleNamespace(options=types.SimpleNamespace(describe=lambda: "whole"))

        def run(self, dataset):
            runs.append(dataset)
            return {"loss": 0.5, "mean_iou": 0.25 * len(runs), "per_class_iou": [0.5, 0.0]}, np.eye(2, dtype=np.int64)

    path = tmp_path / "eval_results_val.json"
    action = A.Evaluate(FakeEvaluator(), "the dataset", every=4, results_path=str(path), split="val")
    quiet = _window(2)
    action(quiet)
    assert quiet.eval is None and not runs
    due = _window(4)
    action(due)
    assert due.eval[0]["mean_iou"] == 0.25 and runs == ["the dataset"]
    assert "eval step 4: loss 0.5000  mean_iou 0.2500" in capsys.readouterr().out
    action(_window(5, last=True))
    action.end(5)
    # The layout of `segtrain evaluate`'s results (checkpoint None: the model in training).
    assert json.loads(path.read_text()) == {
        "loss": 0.5, "mean_iou": 0.5, "per_class_iou": [0.5, 0.0], "step": 5, "split": "val", "checkpoint": None,
        "inference": "whole", "class_names": ["bg", "fg"],
        "per_class": {"bg": {"iou": 0.5}, "fg": {"iou": 0.0}}, "confusion_matrix": [[1, 0], [0, 1]]}
    assert "per_class_iou" in capsys.readouterr().out  # the table


def test_keep_best_saves_on_improvement_and_counts_the_rest():
    checkpoints = FakeCheckpoints()
    best = A.KeepBest(checkpoints, "mean_iou", "max", min_delta=0.01)
    best(_window(2))  # no evaluation: nothing happens
    for step, value in ((3, 0.5), (6, 0.505), (9, 0.7), (12, 0.1)):
        best(_window(step, results={"mean_iou": value}))
    assert checkpoints.best_saved == [3, 9]
    assert checkpoints.records[-1] == {"metric": "mean_iou", "mode": "max", "value": 0.7, "step": 9,
                                       "path": "ckpt-9", "evaluations_without_improvement": 1}
    assert best.stale == 1
    nan = A.KeepBest(FakeCheckpoints(), "loss", "min")
    nan(_window(3, results={"loss": float("nan")}))
    assert nan.checkpoints.best_saved == [] and nan.stale == 1


def test_keep_best_resumes_its_record_unless_the_metric_changed(capsys):
    record = {"metric": "loss", "mode": "min", "value": 0.3, "step": 6, "path": "ckpt-6",
              "evaluations_without_improvement": 2}
    assert A.KeepBest(FakeCheckpoints(record), "loss", "min").record == record
    fresh = A.KeepBest(FakeCheckpoints(record), "mean_iou", "max")
    assert fresh.record["value"] is None and fresh.stale == 0
    assert "now by mean_iou (max): starting a new record" in capsys.readouterr().out


def test_early_stopping_after_patience_evaluations_without_improvement(capsys):
    best = A.KeepBest(FakeCheckpoints(), "loss", "min")
    stopping = A.EarlyStopping(best, patience=2)
    decisions = []
    for step, loss in ((3, 1.0), (6, 1.5), (7, 1.2), (9, 1.4)):
        window = _window(step, results=None if step == 7 else {"loss": loss})
        best(window)
        decisions.append(stopping(window))
    assert decisions == [False, False, False, True]
    assert "Early stopping at step 9: loss has not improved for 2 evaluations (best 1.0 at step 3)" in \
        capsys.readouterr().out
    assert stopping.stopped() and not A.EarlyStopping(best, patience=0).stopped()


def test_summaries_and_panels_write_tensorboard_events(tmp_path):
    info = DatasetInfo(num_classes=2, class_names=("bg", "fg"))
    writer = tf.summary.create_file_writer(str(tmp_path / "eval"))
    A.TrainSummaries(writer)(_window(4))
    A.EvalSummaries(writer, info.class_names)(_window(4, results={"mean_iou": 0.5, "per_class_iou": [0.5, 1.0]}))
    images = tf.data.Dataset.from_tensors({"image": tf.zeros([2, 8, 8, 3]),
                                           "label": tf.zeros([2, 8, 8], tf.int32)})
    model = lambda x, training: tf.one_hot(tf.zeros(tf.shape(x)[:3], tf.int32), 2)  # noqa: E731
    A.ImagePanels(writer, images, Inference(model, 2), info, Normalization(), count=2)(
        _window(4, results={"mean_iou": 0.5}))
    writer.close()
    tags = read_tags(str(tmp_path / "eval"))
    assert {"loss", "learning_rate", "mean_iou", "per_class_iou/bg", "per_class_iou/fg", "confusion_matrix/0",
            "examples/0", "examples/1"} <= tags
    assert read_scalars(str(tmp_path / "eval"))["mean_iou"] == [(4, 0.5)]


@pytest.mark.slow  # trains or evaluates a run end to end: the full tier
def test_a_new_action_joins_a_run_without_touching_the_loop(tmp_path, configure):
    """What a preemption or profiler action will do: see every window, stop the run."""
    from segtrain.train.trainer import train

    class StopAtFour(A.Action):
        every = 4

        def __init__(self):
            self.seen = []

        def __call__(self, window):
            self.seen.append(window.step)
            return window.step == 4

    configure("train.num_steps = 12", "train.eval_every = 0", "train.steps_per_loop = 3", "train.num_image_panels = 0")
    action = StopAtFour()
    train(str(tmp_path), extra_actions=[action])
    assert action.seen == [3, 4]  # its `every` cut the window at 4
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")  # a stop saves where it stopped
