"""train.on_nan = 'restore': a NaN loss reloads the last good checkpoint and the run goes on."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from registry import LOSSES
from segtrain.errors import SegtrainError
from segtrain.losses import cross_entropy
from segtrain.train.trainer import train
from tests.conftest import event_steps, read_scalars


def _nan_at_calls(*calls: int):
    """A loss plugin that is cross-entropy except at the given calls (1-based), where it is NaN.

    One replica, one call per step: call k is step k until a restore replays steps (the
    evaluation, which calls the loss too, runs only at the end: train.eval_every = 0).
    """

    @LOSSES.register("test_nan_at_calls", override=True)
    def test_nan_at_calls(ignore_label=255):
        base = cross_entropy(ignore_label=ignore_label)
        counter = tf.Variable(0, dtype=tf.int64, trainable=False)
        bad = tf.constant(calls, tf.int64)

        def loss(labels, logits):
            count = counter.assign_add(1)
            value = base(labels, logits)
            # A factor, not tf.where(c, value * nan, value): the other branch's gradient would be NaN.
            return value * tf.where(tf.reduce_any(tf.equal(bad, count)), np.nan, 1.0)

        return loss


SETTINGS = ("train.num_steps = 8", "train.steps_per_loop = 2", "train.eval_every = 0", "train.checkpoint_every = 2",
            "train.on_nan = 'restore'", "train.loss = 'test_nan_at_calls'", "train.num_image_panels = 0",
            "optimizer.name = 'sgd'", "learning_rate.base = 0.01")


@pytest.mark.slow
def test_a_nan_restores_the_last_checkpoint_halves_the_rate_and_the_run_ends(tmp_path, configure, capsys):
    _nan_at_calls(5)
    configure(*SETTINGS)
    train(str(tmp_path))
    out = capsys.readouterr().out
    assert ("The loss became nan at step 5. Restoring ckpt-4 (step 4), learning rate x0.5, and going on with the "
            "next batches (restore 1 of at most 3).") in out
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-8")
    record = json.load(open(tmp_path / "nan_restores.json"))
    assert record["restores"] == [{"step": 5, "loss": "nan", "restored": "ckpt-4", "restored_step": 4,
                                   "lr_factor": 0.5}]
    scalars = read_scalars(str(tmp_path / "train"))
    assert scalars["nan_restores"] == [(5, 1.0)]
    rates = dict(scalars["learning_rate"])  # the rate of the next step, at each window end
    assert rates[2] == pytest.approx(0.01) and rates[8] == pytest.approx(0.005)
    assert all(np.isfinite(v) for _, v in scalars["loss"])  # the bad window was not summarised
    assert os.path.exists(tmp_path / "eval_results_validation.json")


@pytest.mark.slow
def test_the_steps_trained_again_after_a_restore_are_in_tensorboard_once(tmp_path, configure):
    """Checkpoints every 4 steps, windows of 2: window 6 is summarised, the NaN at step 7 goes
    back to ckpt-4, and steps 5-6 are trained and summarised again."""
    _nan_at_calls(7)
    configure(*SETTINGS, "train.checkpoint_every = 4")
    train(str(tmp_path))
    steps = event_steps(str(tmp_path / "train"))
    assert not sorted({s for s in steps if steps.count(s) > 1})
    assert ("loss", 6) in steps and ("nan_restores", 7) in steps
    assert [step for tag, step in steps if tag == "loss"] == [2, 4, 6, 8]


@pytest.mark.slow
def test_restores_are_bounded_then_the_run_stops_with_the_checkpoint_intact(tmp_path, configure):
    _nan_at_calls(3, 7)  # step 3; after the restore to step 2, calls 5-6 are steps 3-4 again, call 7 is step 5
    configure(*SETTINGS, "train.max_nan_restores = 1")
    with pytest.raises(SegtrainError, match=r"The loss became nan at step 5\. The run has restored 1 time\(s\) already "
                                            r"\(train\.max_nan_restores=1\)\. The last good checkpoint, ckpt-4, is intact"):
        train(str(tmp_path))
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")


def test_on_nan_must_be_stop_or_restore(configure):
    from segtrain.experiment import ExperimentConfig

    configure("train.on_nan = 'skip'")
    with pytest.raises(SegtrainError, match=r"train.on_nan='skip': use 'stop' or 'restore'"):
        ExperimentConfig()
