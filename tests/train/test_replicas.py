"""Per-replica state on two logical CPU replicas: what must agree agrees, what must differ differs.

The checks run in one process of their own (tests/train/replicas_check.py), since the CPU is
split before TensorFlow starts. What every registered model holds after every window, under
each precision, XLA and accumulation, is checked in tests/models/test_training.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seen():
    proc = subprocess.run([sys.executable, "-m", "tests.train.replicas_check"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT "):])


def test_batch_norm_statistics_agree_at_the_window_end(seen):
    bn = seen["batch_norm"]
    # Every moving mean and variance of the U-Net (2 levels + bottleneck: 10 batch norms).
    assert len(bn["drifting"]) == 20 and all(p.endswith(("moving_mean", "moving_variance")) for p in bn["drifting"])
    assert bn["moved"] and np.isfinite(bn["loss"])
    assert bn["after_window"] == []
    # Keras 3 alone: the replicas' statistics part after a window of their own batches.
    assert sorted(bn["without_average"]) == sorted(bn["drifting"])


def test_each_replica_draws_its_own_dropout_mask(seen):
    dropout = seen["dropout"]
    assert dropout["before"], "Keras 3 alone: every replica draws the same mask"
    assert not dropout["after"], "after decorrelate_replicas each replica draws its own"
    assert dropout["next_draw_differs"]
    # Replica 0 keeps the checkpointed seed; replica 1's is offset (SEED_STRIDE).
    (seed0, counter0), (seed1, counter1) = dropout["seeds"]
    assert counter0 == counter1 and seed1 - seed0 == 0x9E3779B1


def test_a_nan_restore_brings_every_replica_back_alike(seen):
    restored = seen["nan_restore"]
    assert restored["disagree"] == [] and restored["step"] == [0, 0]
    assert restored["lr_factor"] == [0.25, 0.25]
    assert restored["seed_gap"] == [0x9E3779B1], "each replica keeps its own dropout draws"
    # Keras 3 does not checkpoint SeedGenerator states, so a restore leaves them as they are and
    # Trainer.decorrelate_replicas runs once. Should Keras start saving them, it must run again
    # after every restore.
    assert restored["checkpointed"] == []


def test_each_replica_jitters_its_own_examples_on_the_device(seen):
    # pipeline.colour_on_device: the draws come with the examples, and the replicas' differ.
    assert seen["colour"] == {"brightness": False, "contrast": False}


def test_an_overflow_on_one_replica_skips_the_float16_step_on_all(seen):
    agreed = seen["loss_scale"]["agreed"]
    assert agreed["w"] == [[1.0, 1.0, 1.0]] * 2, "the step is skipped: the weights stay"
    assert agreed["scale"] == [16384.0, 16384.0], "and the loss scale halves on both"
    assert agreed["agree"] == []
    # What Keras 3's LossScaleOptimizer does by itself: replica 0's decision, the all-reduced
    # infinite gradient applied. Should this change, finite_everywhere may be dropped.
    alone = seen["loss_scale"]["keras_alone"]
    assert not np.all(np.isfinite(alone["w"])), alone


def test_the_fingerprint_covers_every_replica(seen):
    fp = seen["fingerprint"]
    assert fp["shown"] == [0.0] * 4, "v.numpy() shows replica 0's copy only"
    assert fp["drifted"] != fp["equal"]
    assert fp["named"] == ["probe"]
