"""Evaluation under XLA (train.xla with pipeline.eval_size): one compiled forward pass per
replica serves every batch, the smaller last one padded, and it counts what the plain pass counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO, TINY

# 5 examples in batches of 2: the last batch holds one.
BINDINGS = TINY + ["datasets.shapes.num_validation = 5", "train.eval_batch_size = 2",
                   "pipeline.eval_size = (32, 32)"]


def configure(bindings) -> None:
    from segtrain.commands.configure import parse_config

    gin.clear_config()
    parse_config([], list(bindings) + ["train.xla = True"])


def compare(strategy: tf.distribute.Strategy, experiment=None) -> dict:
    """The plain and the XLA evaluation of one model on one dataset, as JSON-ready facts."""
    from segtrain.experiment import Experiment

    configure(BINDINGS)
    experiment = experiment or Experiment(strategy=strategy)
    dataset = experiment.eval_dataset()
    fast = experiment.evaluator()
    plain = experiment.evaluator()
    plain.xla = False
    gin.clear_config()
    out = {}
    for name, evaluator in (("plain", plain), ("xla", fast)):
        results, cm = evaluator.run(dataset)
        signatures = [c.structured_input_signature[0][0].shape.as_list()
                      for c in evaluator._compiled_logits._list_all_concrete_functions()]
        out[name] = {"cm": cm.tolist(), "loss": results["loss"], "mean_iou": results["mean_iou"],
                     "pixel_accuracy": results["pixel_accuracy"], "compiled_shapes": signatures}
    out["replicas"] = strategy.num_replicas_in_sync
    out["batches"] = [int(b["image"].shape[0]) for b in dataset]
    return out


def check(out: dict, per_replica: int) -> None:
    plain, xla = out["plain"], out["xla"]
    cm, cm_xla = np.array(plain["cm"]), np.array(xla["cm"])
    # The same labelled pixels, the padding's none; XLA's float rounding may at most move a
    # pixel whose two best classes tie.
    assert cm_xla.sum() == cm.sum() and cm_xla.sum(axis=1).tolist() == cm.sum(axis=1).tolist()
    assert np.abs(cm_xla - cm).sum() <= 1e-3 * cm.sum()
    assert xla["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    for key in ("mean_iou", "pixel_accuracy"):
        assert xla[key] == pytest.approx(plain[key], abs=1e-3)
    # One program: every batch, the last one too, reached XLA at the full per-replica size.
    assert plain["compiled_shapes"] == []
    assert xla["compiled_shapes"] and all(s == [per_replica, 32, 32, 3] for s in xla["compiled_shapes"])


@pytest.fixture(scope="module")
def experiment():
    """One tiny experiment (its model built once) for the tests of this process."""
    from segtrain.experiment import Experiment

    configure(BINDINGS)
    experiment = Experiment()
    experiment.model
    gin.clear_config()
    return experiment


def test_xla_evaluation_counts_what_the_plain_one_counts_with_one_program(experiment):
    out = compare(tf.distribute.get_strategy(), experiment)
    assert out["batches"] == [2, 2, 1]
    check(out, per_replica=2)
    assert len(out["xla"]["compiled_shapes"]) == 1


def test_without_one_image_size_or_with_sliding_windows_evaluation_runs_without_xla(experiment, capsys):
    configure([b for b in BINDINGS if not b.startswith("pipeline.eval_size")])
    evaluator, dataset = experiment.evaluator(), experiment.eval_dataset()
    assert evaluator.xla
    for _ in range(2):
        results, cm = evaluator.run(dataset)
        assert cm.sum() > 0 and np.isfinite(results["loss"])
    assert evaluator._compiled_logits.experimental_get_tracing_count() == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "XLA" in line]
    assert lines == ["Evaluation runs without XLA: its images differ in size (pipeline.eval_size gives them one)."]
    # Sliding windows over images of one size: the plain pass (tests/test_evaluate.py) as well.
    configure(BINDINGS)
    sliding = experiment.evaluator(experiment.inference(mode="slide", crop_size=(16, 16)))
    assert sliding._xla_batch_size(experiment.eval_dataset()) == 0
    assert capsys.readouterr().out == ("Evaluation runs without XLA: inference is slide 16x16 every 11x11, "
                                       "not whole images.\n")


class HostRound(keras.layers.Layer):
    """Runs a NumPy function on the host: fine for TensorFlow, impossible for XLA."""

    def call(self, x):
        return tf.ensure_shape(tf.numpy_function(np.round, [x], x.dtype), x.shape)


def test_a_model_xla_cannot_compile_is_one_clear_error():
    from segtrain.data.info import DatasetInfo
    from segtrain.errors import SegtrainError
    from segtrain.evaluation import Evaluator

    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, dtype="float32")(HostRound()(inputs)))
    info = DatasetInfo(num_classes=2, ignore_label=255, class_names=("a", "b"))
    data = tf.data.Dataset.from_tensor_slices({"image": tf.zeros([3, 8, 8, 3]),
                                               "label": tf.zeros([3, 8, 8], tf.int32)})
    loss = lambda labels, logits: tf.reduce_mean(  # noqa: E731
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits), axis=[1, 2])
    evaluator = Evaluator(model, loss, info, tf.distribute.get_strategy(), xla=True)
    with pytest.raises(SegtrainError) as e:
        evaluator.run(data.batch(2))
    message = str(e.value)
    assert message.startswith("XLA could not compile the evaluation of this model: ")
    assert message.endswith("Evaluate without XLA (train.xla = False).") and "PyFunc" in message
    evaluator.xla = False
    assert evaluator.run(data.batch(2))[1].sum() == 3 * 64


@pytest.mark.slow
def test_xla_evaluation_over_two_replicas_counts_what_the_plain_one_counts():
    # 2 examples a batch over 2 replicas; the last batch's one example leaves a replica empty.
    result = subprocess.run([sys.executable, "-m", "tests.test_fast_eval", "2"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2 and out["batches"] == [2, 2, 1]
    check(out, per_replica=1)


if __name__ == "__main__":  # one comparison over N logical CPU replicas, in a process of its own
    replicas = int(sys.argv[1])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    facts = compare(tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)]))
    print(json.dumps(facts))
