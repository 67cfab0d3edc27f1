"""Data parallelism for real: MirroredStrategy over logical CPU devices, in a fresh process.

The CPU must be split before TensorFlow starts, so the runs train in a process of their own,
one after the other, with one strategy of each kind (a second MirroredStrategy in a process
would reuse the first one's collective instance keys).
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

from tests.conftest import REPO, TINY, segtrain_cli, segtrain_main
from tests.conftest import assert_user_error as _fails
from tests.evaluated import assert_evaluated_model_is_saved
from tests.conftest import tiny_flags as _params

SCRIPT = textwrap.dedent("""
    import json, sys
    import gin
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
    from segtrain.errors import SegtrainError
    from segtrain.runtime.distribute import build_strategy
    from segtrain.train.trainer import train

    spec = json.loads(sys.argv[1])
    strategies = {}
    for name, bindings in spec["strategies"].items():  # "two" first: it splits the CPU
        gin.clear_config()
        parse_config([], bindings)
        strategies[name] = build_strategy()
    results = {}
    for run in spec["runs"]:
        gin.clear_config()
        parse_config([], run["bindings"])
        try:
            results[run["name"]] = {"loss": train(run["model_dir"], strategies[run["strategy"]])["loss"]}
        except SegtrainError as e:
            results[run["name"]] = {"error": str(e)}
    print("RESULT " + json.dumps(results))
""")

STRATEGIES = {
    "two": ["distribute.strategy = 'mirrored'", "distribute.cpu_replicas = 2"],
    "one": ["distribute.strategy = 'one_device'"],
}
# Same seed, data order and global batch on one and two replicas. SGD, not Adam: Adam's
# g / sqrt(v) turns summation-order noise in a near-zero gradient into a step of the full
# learning rate, so its weights differ by whatever a data draw makes of that.
SAME_WEIGHTS = ["learning_rate.base = 0.01", "train.clip_norm = 1.0", "pipeline.deterministic = True",
                "optimizer.name = 'sgd'", "train.num_image_panels = 0"]
BATCH_NORM = {"no_batch_norm": "models.unet.batch_norm = False",
              "synchronized_batch_norm": "train.synchronized_batch_norm = True"}


def _ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (model_dir, results)} of every run, trained in one fresh process."""
    root = tmp_path_factory.mktemp("replicas")
    runs = [{"name": f"{strategy}-{bn}", "strategy": strategy, "bindings": TINY + SAME_WEIGHTS + [binding]}
            for bn, binding in BATCH_NORM.items() for strategy in ("one", "two")]
    runs += [
        {"name": "with_unused_weights", "strategy": "two",
         "bindings": TINY + ["train.model = 'with_unused_weights'", "train.clip_norm = 0.5"]},
        {"name": "batch_3", "strategy": "two", "bindings": TINY + ["train.batch_size = 3"]},
        # Batch norm as the models build it: each replica's own batch statistics.
        {"name": "two-default_batch_norm", "strategy": "two", "bindings": TINY},
        {"name": "two-colour_on_device", "strategy": "two",
         "bindings": TINY + SAME_WEIGHTS + [BATCH_NORM["no_batch_norm"], "pipeline.colour_on_device = True"]},
    ]
    for run in runs:
        run["model_dir"] = str(root / run["name"])
    spec = {"strategies": STRATEGIES, "runs": runs}
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], cwd=REPO, capture_output=True,
                            text=True, timeout=900, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout[-2000:], result.stderr[-3000:])
    results = json.loads(lines[-1][len("RESULT "):])
    return {run["name"]: (root / run["name"], results[run["name"]]) for run in runs}


@pytest.mark.slow
def test_subclassed_model_with_unused_weights_and_clipping_on_two_replicas(runs):
    model_dir, results = runs["with_unused_weights"]
    assert np.isfinite(results.get("loss", np.nan)), results
    assert (model_dir / "ckpt-6.index").exists()


@pytest.mark.slow
def test_global_batch_must_divide_over_replicas(runs):
    _, results = runs["batch_3"]
    assert results == {"error": "train.batch_size=3 does not divide over 2 replicas: use a multiple of 2."}


@pytest.mark.slow
def test_cpu_replicas_with_a_one_device_strategy(tmp_path):
    # Refused before any device is split, so this process can ask.
    _fails(segtrain_main("train", f"--model_dir={tmp_path}", "--strategy=one_device", "--cpu_replicas=2", *_params()),
           "--cpu_replicas=2 splits one machine's CPU for MirroredStrategy; it does not combine with "
           "--strategy=one_device")


def _variables(model_dir) -> dict[str, np.ndarray]:
    """Every variable of the latest checkpoint: weights, batch-norm statistics, optimizer state."""
    reader = tf.train.load_checkpoint(str(model_dir))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH"))}


@pytest.mark.parametrize("batch_norm", BATCH_NORM)
@pytest.mark.slow
def test_one_and_two_replicas_train_the_same_weights(runs, batch_norm):
    """The replicas split each batch and the gradient is summed over them, so 2 replicas must
    land where 1 does (up to float summation order)."""
    (one_dir, _), (two_dir, _) = runs[f"one-{batch_norm}"], runs[f"two-{batch_norm}"]
    one, two = _variables(one_dir), _variables(two_dir)
    assert one.keys() == two.keys() and len(one) > 30
    for name in one:
        np.testing.assert_allclose(one[name], two[name], rtol=1e-4, atol=2e-5, err_msg=name)
    results = [json.loads((d / "eval_results_validation.json").read_text()) for d in (one_dir, two_dir)]
    for key in ("loss", "pixel_accuracy", "mean_iou"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_two_replicas_save_the_model_they_evaluated(runs, tmp_path):
    """Each replica normalises with its own batch statistics; at every window end they are
    averaged, so the checkpoint, the best checkpoint and the export hold the model the run's
    own evaluations scored."""
    model_dir, results = runs["two-default_batch_norm"]
    assert np.isfinite(results["loss"])
    assert_evaluated_model_is_saved(model_dir, tmp_path)


@pytest.mark.slow
def test_each_replica_finishes_its_uint8_batch_as_the_pipeline_would(runs):
    """pipeline.colour_on_device: the replicas normalise their own uint8 crops in the step."""
    (host_dir, _), (device_dir, _) = runs["two-no_batch_norm"], runs["two-colour_on_device"]
    host, device = _variables(host_dir), _variables(device_dir)
    assert host.keys() == device.keys()
    for name in host:  # the crops are rounded to whole levels first: close, not equal
        np.testing.assert_allclose(device[name], host[name], rtol=2e-2, atol=2e-3, err_msg=name)


@pytest.mark.slow
def test_xla_with_bfloat16_on_two_replicas(tmp_path):
    # The colour jitter and normalisation of the uint8 batches compile with the step.
    result = _ok(segtrain_cli("train", f"--model_dir={tmp_path}", "--cpu_replicas=2", "--xla",
                              "--precision=mixed_bfloat16",
                              *_params("train.num_image_panels = 0", "pipeline.colour_on_device = True",
                                       "pipeline.brightness = 0.1", "pipeline.hue = 0.05",
                                       "pipeline.saturation = (0.8, 1.2)")))
    assert "warning: --xla without a GPU: XLA's speed-up is on GPUs." in result.stderr
    results = json.loads((tmp_path / "eval_results_validation.json").read_text())
    assert np.isfinite(results["loss"]) and (tmp_path / "ckpt-6.index").exists()
    operative = (tmp_path / "operative_config.gin").read_text()
    assert "train.xla = True" in operative and "distribute.cpu_replicas = 2" in operative
