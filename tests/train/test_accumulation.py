"""Gradient accumulation: k micro-batches of B/k make the update one batch of B makes.

The same scenario runs on one replica (in this process) and on two (MirroredStrategy over two
logical CPU devices, in a fresh process: the CPU can only be split before TensorFlow starts).
"""

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

from registry import DATASETS, MODELS
from segtrain.commands.configure import parse_config
from segtrain.data.info import DatasetInfo
from segtrain.errors import SegtrainError
from segtrain.experiment import Experiment, ExperimentConfig
from segtrain.train import actions as A
from segtrain.train.trainer import Trainer, train
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist for variables")

BATCH, STEPS, LR, CLIP = 4, 3, 0.05, 0.01


@MODELS.register("accumulation_test_net", override=True)
class AccumulationTestNet(keras.Model):
    """Two convolutions, which trace in a fraction of U-Net's time, one with a weight penalty
    (a regularization loss), and a layer the loss never reaches (its variables get no gradient).
    No batch norm: its statistics are per micro-batch by design, which would make the weights
    differ for a reason of its own. No ReLU either: oneDNN's fused convolution + bias + ReLU
    (TensorFlow's CPU kernels on AVX-512 machines) maps a NaN to 0, and the NaN test needs its
    NaN pixel to reach the loss."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.hidden = keras.layers.Conv2D(8, 3, padding="same",
                                          kernel_regularizer=keras.regularizers.L2(0.01))
        self.head = keras.layers.Conv2D(num_classes, 1, dtype="float32")
        self.unused = keras.layers.Dense(2)
        self.unused.build((None, 3))

    def call(self, x):
        return self.head(self.hidden(x))


@DATASETS.register("accumulation_test_data", override=True)
def accumulation_test_data(split: str = "train"):
    """Only the facts are read: the scenario feeds its own batches."""
    example = {"image": np.zeros((32, 32, 3), np.uint8), "label": np.zeros((32, 32), np.uint8)}
    return tf.data.Dataset.from_tensors(example).repeat(8), DatasetInfo(num_classes=4, name="accumulation_test_data",
                                                                        num_examples={split: 8})


# SGD (with its default momentum) on a poly schedule over num_steps: the rate changes at every
# update, so a schedule that counted micro-batches would show.
BINDINGS = TINY + ["train.model = 'accumulation_test_net'", "train.dataset = 'accumulation_test_data'",
                   "optimizer.name = 'sgd'", f"learning_rate.base = {LR}", "learning_rate.schedule = 'poly'",
                   f"train.batch_size = {BATCH}"]


def _trainer(model_dir: str, strategy: tf.distribute.Strategy, *bindings: str) -> Trainer:
    gin.clear_config()
    parse_config([], BINDINGS + list(bindings))
    config = ExperimentConfig()
    return Trainer(Experiment(config, strategy, split=config.train_split), model_dir)


def _batches(nan: bool = False) -> dict[str, np.ndarray]:
    """STEPS fixed global batches; with ``nan``, one batch whose last example's image is NaN.

    On 2 replicas with 2 accumulation steps the last example is replica 1's second micro-batch.
    """
    rng = np.random.default_rng(0)
    images = rng.normal(size=(STEPS, BATCH, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=(STEPS, BATCH, 32, 32)).astype(np.int32)
    if nan:
        images, labels = images[:1].copy(), labels[:1]
        images[0, -1, 5, 5, 0] = np.nan
    return {"image": images, "label": labels}


def _iterator(strategy, batches):
    return iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(batches)))


def _weights(trainer: Trainer) -> list[np.ndarray]:
    return [v.numpy().copy() for v in trainer.model.trainable_variables]


def scenario(model_dir: str, strategy: tf.distribute.Strategy) -> dict:
    """Trains STEPS updates with accumulation_steps 1 and 2 from the same start on the same
    batches, one clipped update with 2, and a batch with a NaN image; returns what the tests check.
    """
    out: dict = {"replicas": strategy.num_replicas_in_sync}
    runs = {}
    for k in (1, 2):
        trainer = _trainer(os.path.join(model_dir, f"k{k}"), strategy, f"train.accumulation_steps = {k}")
        iterator, start = _iterator(strategy, _batches()), _weights(trainer)
        first = trainer.train_window(iterator, 0, 1, first=True)
        after_one = _weights(trainer)
        last = trainer.train_window(iterator, 1, STEPS - 1)
        runs[k] = dict(trainer=trainer, start=start, after_one=after_one, end=_weights(trainer),
                       losses=np.concatenate([first.losses, last.losses]),
                       metrics=[first.scalars[m] for m in ("pixel_accuracy", "mean_iou")],
                       lr=last.scalars["learning_rate"],
                       iterations=int(trainer.optimizer.iterations.numpy()), step=int(trainer.step.numpy()))
    one, two = runs[1], runs[2]
    out["same_start"] = all(np.array_equal(a, b) for a, b in zip(one["start"], two["start"]))
    # Compared as updates (end - start), so the tolerance is relative to what training moved.
    out["update_error"] = max(float(np.max(np.abs((b - s) - (a - s)) / (np.max(np.abs(a - s)) + 1e-12)))
                              for a, b, s in zip(one["end"], two["end"], one["start"]))
    out["moved"] = max(float(np.max(np.abs(a - s))) for a, s in zip(one["end"], one["start"]))
    out["losses"] = [one["losses"].tolist(), two["losses"].tolist()]
    out["metrics"] = [one["metrics"], two["metrics"]]  # of the summed confusion matrix
    out["iterations"], out["steps"] = [one["iterations"], two["iterations"]], [one["step"], two["step"]]
    out["learning_rate"] = [one["lr"], two["lr"]]

    # Clipping acts on the accumulated gradient: the first (momentum-free) SGD update is the
    # full-batch gradient's direction at length learning rate * clip_norm. (A rate of 1 keeps that
    # update far above the float32 resolution of the weights.)
    clipped = _trainer(os.path.join(model_dir, "clip"), strategy, "train.accumulation_steps = 2",
                       f"train.clip_norm = {CLIP}", "learning_rate.base = 1.0")
    clipped.train_window(_iterator(strategy, _batches()), 0, 1, first=True)
    unclipped = np.concatenate([(a - s).ravel() for a, s in zip(one["after_one"], one["start"])])
    update = np.concatenate([(a - s).ravel() for a, s in zip(_weights(clipped), one["start"])])
    out["gradient_norm"] = float(np.linalg.norm(unclipped)) / LR
    out["clipped_norm"] = float(np.linalg.norm(update))
    out["clipped_direction_error"] = float(np.max(np.abs(update / np.linalg.norm(update)
                                                         - unclipped / np.linalg.norm(unclipped))))

    # A NaN in one example of one replica's last micro-batch reaches the step's loss.
    trainer = two["trainer"]
    replica_batches = strategy.experimental_local_results(next(_iterator(strategy, _batches(nan=True))))
    out["nan_in_last_replica_only"] = [bool(np.isnan(b["image"].numpy()).any()) for b in replica_batches]
    window = trainer.train_window(_iterator(strategy, _batches(nan=True)), STEPS, 1)
    out["nan_window_losses"] = window.losses.tolist()
    try:
        A.OnNonFinite(trainer.checkpoints, "stop")(window)
        out["nan_error"] = None
    except SegtrainError as e:
        out["nan_error"] = str(e)
    # Twice the examples a replica gets, as micro-batches: an error before any training.
    too_many = 2 * BATCH // strategy.num_replicas_in_sync
    gin.clear_config()
    parse_config([], BINDINGS + [f"train.accumulation_steps = {too_many}"])
    try:
        Experiment(ExperimentConfig(), strategy).train_dataset(0)
        out["split_error"] = None
    except SegtrainError as e:
        out["split_error"] = str(e)
    gin.clear_config()
    return out


TWO_REPLICAS = """
import json, sys
from segtrain.runtime.distribute import split_cpu
import tensorflow as tf
strategy = tf.distribute.MirroredStrategy(split_cpu(2))
from tests.train.test_accumulation import scenario
print("RESULT " + json.dumps(scenario(sys.argv[1], strategy)))
"""


@pytest.fixture(scope="module")
def one_replica(tmp_path_factory):
    return scenario(str(tmp_path_factory.mktemp("one")), tf.distribute.get_strategy())


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    result = subprocess.run([sys.executable, "-c", TWO_REPLICAS, str(tmp_path_factory.mktemp("two"))], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return json.loads(result.stdout.split("RESULT ", 1)[1])


@pytest.fixture(params=["one_replica", pytest.param("two_replicas", marks=pytest.mark.slow)])
def results(request):
    out = request.getfixturevalue(request.param)
    assert out["replicas"] == (1 if request.param == "one_replica" else 2)
    return out


def test_micro_batches_train_the_weights_of_the_full_batch(results):
    assert results["same_start"] and results["moved"] > 1e-3
    assert results["update_error"] < 1e-4
    one, two = results["losses"]
    np.testing.assert_allclose(two, one, rtol=1e-5)  # the step's loss: the sum over micro-batches
    assert results["metrics"][0] == pytest.approx(results["metrics"][1], abs=1e-6)


def test_optimizer_and_schedule_count_updates_not_micro_batches(results):
    assert results["iterations"] == [STEPS, STEPS] and results["steps"] == [STEPS, STEPS]
    expected = LR * (1 - STEPS / 6) ** 0.9  # poly over TINY's 6 steps, after STEPS updates
    assert results["learning_rate"] == pytest.approx([expected, expected], rel=1e-6)


def test_clipping_acts_on_the_accumulated_gradient(results):
    # Clipping binds, so clipping each micro-batch's part would give another length.
    assert results["gradient_norm"] > 3 * CLIP
    assert results["clipped_norm"] == pytest.approx(CLIP, rel=1e-4)
    assert results["clipped_direction_error"] < 1e-4


def test_nan_in_one_replicas_last_micro_batch_stops_the_run(results):
    assert results["nan_in_last_replica_only"][-1] and not any(results["nan_in_last_replica_only"][:-1])
    assert np.isnan(results["nan_window_losses"][0])
    assert results["nan_error"].startswith(f"The loss became nan at step {STEPS + 1}.")


def test_accumulation_steps_must_split_each_replicas_batch(results):
    replicas = results["replicas"]
    assert results["split_error"] == (
        f"train.batch_size=4 over {replicas} replica{'s' if replicas > 1 else ''} gives {4 // replicas} examples per "
        f"replica, which do not split into train.accumulation_steps={8 // replicas} micro-batches: use a "
        f"train.batch_size that is a multiple of 8, or fewer accumulation steps.")


def test_too_many_accumulation_steps_stop_before_training(tmp_path):
    parse_config([], BINDINGS + ["train.accumulation_steps = 8"])
    with pytest.raises(SegtrainError) as e:
        train(str(tmp_path))
    assert str(e.value) == ("train.batch_size=4 over 1 replica gives 4 examples per replica, which do not split "
                            "into train.accumulation_steps=8 micro-batches: use a train.batch_size that is a "
                            "multiple of 8, or fewer accumulation steps.")
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.filterwarnings("ignore:--precision=mixed_float16 without a GPU")
def test_float16_loss_scaling_with_accumulation_and_clipping(tmp_path):
    """Each micro-batch's loss is scaled, apply_gradients unscales the sum, clipping unscales
    first: the updates match one batch's (to float16's precision) and the scale stays."""
    strategy, runs = tf.distribute.get_strategy(), {}
    for k in (1, 2):
        trainer = _trainer(str(tmp_path / f"k{k}"), strategy, f"train.accumulation_steps = {k}",
                           "train.precision = 'mixed_float16'", "train.clip_norm = 0.1")
        start = _weights(trainer)
        window = trainer.train_window(_iterator(strategy, _batches()), 0, STEPS, first=True)
        updates = [w - s for w, s in zip(_weights(trainer), start)]
        runs[k] = updates, window.scalars["loss_scale"], int(trainer.optimizer.iterations.numpy())
    gin.clear_config()
    assert runs[1][1:] == runs[2][1:] == (2.0**15, STEPS)
    for a, b in zip(runs[1][0], runs[2][0]):
        np.testing.assert_allclose(b, a, atol=1e-2 * np.max(np.abs(a)))
