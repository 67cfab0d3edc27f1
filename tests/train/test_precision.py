"""Training in mixed precision: bfloat16 and float16, dynamic loss scaling."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from segtrain.errors import SegtrainWarning
from segtrain.experiment import Experiment, ExperimentConfig
from segtrain.train.optimizers import loss_scale
from segtrain.train.trainer import Trainer, train
from tests.conftest import read_scalars

# Training runs under mixed policies; float16 is emulated on a CPU.
pytestmark = pytest.mark.slow


def _trainer(model_dir) -> Trainer:
    config = ExperimentConfig()
    return Trainer(Experiment(config, split=config.train_split), str(model_dir))


@pytest.fixture(autouse=True)
def float32_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_bfloat16_trains_the_quickstart_model_with_falling_loss(tmp_path, configure):
    # The quickstart's U-Net (depth 3, 16 filters) at a smaller crop: without AVX-512 the CPU
    # emulates bfloat16.
    configure("train.precision = 'mixed_bfloat16'", "models.unet.depth = 3", "models.unet.base_filters = 16",
              "train.batch_size = 4", "train.num_steps = 20", "train.steps_per_loop = 5",
              "train.eval_every = 0", "train.num_image_panels = 0", "pipeline.crop_size = (32, 32)",
              "learning_rate.base = 0.003")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SegtrainWarning)
        results = train(str(tmp_path))
    losses = [v for _, v in sorted(read_scalars(str(tmp_path / "train"))["loss"])]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert np.isfinite(results["loss"])
    assert "loss_scale" not in read_scalars(str(tmp_path / "train"))  # bfloat16 needs no scaling


def test_float16_trains_a_tiny_model_with_loss_scaling(tmp_path, configure):
    configure("train.precision = 'mixed_float16'", "train.num_image_panels = 0")
    with pytest.warns(SegtrainWarning):
        trainer = _trainer(tmp_path)
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    conv = trainer.model.get_layer("encoder.level0.conv1.conv")
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32"
    logits = trainer.model(tf.zeros([1, 32, 32, 3]))
    assert logits.dtype == tf.float32  # the head stays float32
    results = trainer.fit()
    assert np.isfinite(results["loss"])
    scales = read_scalars(str(tmp_path / "train"))["loss_scale"]
    assert scales and all(v > 0 for _, v in scales)


def test_an_overflowing_float16_step_is_skipped_and_the_scale_drops(tmp_path, configure):
    configure("train.precision = 'mixed_float16'")
    with pytest.warns(SegtrainWarning):
        trainer = _trainer(tmp_path)
    trainer.optimizer.dynamic_scale.assign(2.0**120)  # float16 gradients of this scaled loss overflow
    before = [w.numpy().copy() for w in trainer.model.trainable_weights]
    iterator, _ = trainer.iterator(seed=0)
    losses, _ = trainer._train_loop(iterator, tf.constant(1))
    assert np.isfinite(losses.numpy()).all()  # the reported loss is the unscaled one
    assert loss_scale(trainer.optimizer) == 2.0**119
    after = [w.numpy() for w in trainer.model.trainable_weights]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # the step changed nothing
    # With a sane scale the next step trains again.
    trainer.optimizer.dynamic_scale.assign(2.0**10)
    trainer._train_loop(iterator, tf.constant(1))
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(before, trainer.model.trainable_weights))
