"""Data parallelism for real: MirroredStrategy over logical CPU devices, in fresh processes.

Each run is its own process because the CPU must be split before TensorFlow starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO, TINY, segtrain_cli
from tests.conftest import assert_user_error as _fails
from tests.conftest import tiny_flags as _params

SCRIPT = textwrap.dedent("""
    import json, sys
    import keras
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

    from segtrain.commands.configure import parse_config
    from segtrain.train.trainer import train
    parse_config([], json.loads(sys.argv[2]))
    results = train(sys.argv[1])  # the strategy comes from distribute.* in gin
    print("RESULT " + json.dumps({"loss": results["loss"]}))
""")


def _ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_subclassed_model_with_unused_weights_and_clipping_on_two_replicas(tmp_path):
    bindings = TINY + ["distribute.cpu_replicas = 2", "train.model = 'with_unused_weights'", "train.clip_norm = 0.5"]
    result = _ok(subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(bindings)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    ))
    assert "RESULT" in result.stdout and (tmp_path / "ckpt-6.index").exists()


@pytest.mark.slow
def test_global_batch_must_divide_over_replicas(tmp_path):
    _fails(segtrain_cli("train", f"--model_dir={tmp_path}", "--cpu_replicas=2", *_params("train.batch_size = 3")),
           "train.batch_size=3 does not divide over 2 replicas: use a multiple of 2.")


@pytest.mark.slow
def test_cpu_replicas_with_a_one_device_strategy(tmp_path):
    _fails(segtrain_cli("train", f"--model_dir={tmp_path}", "--strategy=one_device", "--cpu_replicas=2", *_params()),
           "--cpu_replicas=2 splits one machine's CPU for MirroredStrategy; it does not combine with "
           "--strategy=one_device")


def _variables(model_dir) -> dict[str, np.ndarray]:
    """Every variable of the latest checkpoint: weights, batch-norm statistics, optimizer state."""
    reader = tf.train.load_checkpoint(str(model_dir))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH"))}


@pytest.mark.parametrize("model", [
    ["models.unet.batch_norm = False"],
    ["models.unet.synchronized_batch_norm = True"],
], ids=["no_batch_norm", "synchronized_batch_norm"])
@pytest.mark.slow
def test_one_and_two_replicas_train_the_same_weights(tmp_path, model):
    """Same seed, data order and global batch: the replicas split each batch, the gradient is
    summed over them, so 2 replicas must land where 1 does (up to float summation order).

    SGD, not Adam: Adam's g / sqrt(v) turns summation-order noise in a near-zero gradient into a
    step of the full learning rate, so its weights differ by whatever a data draw makes of that."""
    runs, procs = {}, {}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        # Side by side: each process spends most of its time tracing, on one core.
        for name, flags in (("one", ["--strategy=one_device"]), ("two", ["--strategy=mirrored", "--cpu_replicas=2"])):
            runs[name] = tmp_path / name
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "segtrain.cli", "train", f"--model_dir={runs[name]}", *flags,
                 *_params(*model, "learning_rate.base = 0.01", "train.clip_norm = 1.0",
                          "pipeline.deterministic = True", "optimizer.name = 'sgd'")],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, (name, out[-2000:], err[-3000:])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    one, two = _variables(runs["one"]), _variables(runs["two"])
    assert one.keys() == two.keys() and len(one) > 30
    for name in one:
        np.testing.assert_allclose(one[name], two[name], rtol=1e-4, atol=2e-5, err_msg=name)
    results = [json.loads((runs[n] / "eval_results_validation.json").read_text()) for n in ("one", "two")]
    for key in ("loss", "pixel_accuracy", "mean_iou"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_xla_with_bfloat16_on_two_replicas(tmp_path):
    result = _ok(segtrain_cli("train", f"--model_dir={tmp_path}", "--cpu_replicas=2", "--xla",
                              "--precision=mixed_bfloat16", *_params("train.num_image_panels = 0")))
    assert "warning: --xla without a GPU: XLA's speed-up is on GPUs." in result.stderr
    results = json.loads((tmp_path / "eval_results_validation.json").read_text())
    assert np.isfinite(results["loss"]) and (tmp_path / "ckpt-6.index").exists()
    operative = (tmp_path / "operative_config.gin").read_text()
    assert "train.xla = True" in operative and "distribute.cpu_replicas = 2" in operative
