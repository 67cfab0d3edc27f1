"""The loop takes its strategy as a parameter: two replicas on two logical CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO, TINY

SCRIPT = textwrap.dedent("""
    import json, sys
    import keras
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from registry import MODELS

    @MODELS.register("with_unused_weights")
    class WithUnusedWeights(keras.Model):
        # A subclassed model (built lazily) with a layer the loss never reaches: no gradient.
        def __init__(self, num_classes):
            super().__init__()
            self.head = keras.layers.Conv2D(num_classes, 3, padding="same", dtype="float32")
            self.unused = keras.layers.Dense(2)
            self.unused.build((None, 3))

        def call(self, x):
            return self.head(x)

    from segtrain import config
    from segtrain.train.trainer import train
    config.parse([], json.loads(sys.argv[2]))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = train(sys.argv[1], strategy=strategy)
    print("RESULT " + json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": results["loss"]}))
""")


def _run(model_dir, bindings):
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_dir), json.dumps(TINY + bindings)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )


def test_mirrored_strategy_trains_with_two_replicas(tmp_path):
    result = _run(tmp_path, ["train.clip_norm = 1.0", "learning_rate.base = 0.01"])
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["replicas"] == 2 and out["loss"] == out["loss"]  # finite, not NaN
    assert (tmp_path / "ckpt-6.index").exists() and (tmp_path / "best" / "best.json").exists()


def test_subclassed_model_with_unused_weights_and_clipping(tmp_path):
    result = _run(tmp_path, ["train.model = 'with_unused_weights'", "train.clip_norm = 0.5"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ckpt-6.index").exists()


def test_global_batch_must_divide_over_replicas(tmp_path):
    result = _run(tmp_path, ["train.batch_size = 3"])
    assert result.returncode != 0
    assert "train.batch_size=3 does not divide over 2 replicas: use a multiple of 2." in result.stderr
