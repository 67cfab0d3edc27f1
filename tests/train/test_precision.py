"""Mixed precision: bfloat16 and float16 training, dynamic loss scaling, hardware checks."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from segtrain.errors import SegtrainError, SegtrainWarning
from segtrain.train import precision as P
from segtrain.train.trainer import Run, TrainConfig, Trainer, train
from tests.conftest import read_scalars


@pytest.fixture(autouse=True)
def float32_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_unknown_precision():
    with pytest.raises(SegtrainError, match="--precision='float8' is not one of float32, mixed_float16"):
        P.check_precision("float8", gpu_details=[])


def test_float16_without_gpu_warns_and_suggests_bfloat16():
    with pytest.warns(SegtrainWarning, match="about 200x slower than float32. Use --precision=mixed_bfloat16"):
        P.check_precision("mixed_float16", gpu_details=[])


@pytest.mark.parametrize("precision, capability, message", [
    ("mixed_bfloat16", (7, 0), "--precision=mixed_bfloat16 needs NVIDIA compute capability 8.0 or newer; "
                               "GPU 0 (Tesla V100) has 7.0: use --precision=mixed_float16"),
    ("mixed_float16", (6, 1), "--precision=mixed_float16 needs NVIDIA compute capability 7.0 or newer; "
                              "GPU 0 (Tesla V100) has 6.1: use --precision=float32."),
])
def test_precision_the_gpu_cannot_do(precision, capability, message):
    gpu = {"device_name": "Tesla V100", "compute_capability": capability}
    with pytest.raises(SegtrainError) as e:
        P.check_precision(precision, gpu_details=[gpu])
    assert message in str(e.value)


def test_bfloat16_on_a_cpu_without_avx512_warns():
    with pytest.warns(SegtrainWarning, match="bfloat16 is emulated here and trains slower than float32"):
        P.check_precision("mixed_bfloat16", gpu_details=[], cpu={"avx2", "fma"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.check_precision("mixed_bfloat16", gpu_details=[], cpu={"avx2", "avx512f"})


def test_precision_the_gpu_can_do():
    P.check_precision("mixed_bfloat16", gpu_details=[{"device_name": "A100", "compute_capability": (8, 0)}])


def test_bfloat16_trains_the_quickstart_model_with_falling_loss(tmp_path, configure):
    # The quickstart's U-Net (depth 3, 16 filters) at a smaller crop: without AVX-512 the CPU
    # emulates bfloat16.
    configure("train.precision = 'mixed_bfloat16'", "models.unet.depth = 3", "models.unet.base_filters = 16",
              "train.batch_size = 4", "train.num_steps = 40", "train.steps_per_loop = 10",
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
        run = Run(str(tmp_path), TrainConfig())
    assert isinstance(run.optimizer, keras.optimizers.LossScaleOptimizer)
    conv = run.model.get_layer("encoder.level0.conv1.conv")
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32"
    logits = run.model(tf.zeros([1, 32, 32, 3]))
    assert logits.dtype == tf.float32  # the head stays float32
    results = Trainer(run).fit()
    assert np.isfinite(results["loss"])
    scales = read_scalars(str(tmp_path / "train"))["loss_scale"]
    assert scales and all(v > 0 for _, v in scales)


def test_an_overflowing_float16_step_is_skipped_and_the_scale_drops(tmp_path, configure):
    configure("train.precision = 'mixed_float16'")
    with pytest.warns(SegtrainWarning):
        run = Run(str(tmp_path), TrainConfig())
    trainer = Trainer(run)
    run.optimizer.dynamic_scale.assign(2.0**120)  # float16 gradients of this scaled loss overflow
    before = [w.numpy().copy() for w in run.model.trainable_weights]
    iterator = iter(run.strategy.experimental_distribute_dataset(run.train_dataset(seed=0)))
    losses, _ = trainer._train_loop(iterator, tf.constant(1))
    assert np.isfinite(losses.numpy()).all()  # the reported loss is the unscaled one
    assert P.loss_scale(run.optimizer) == 2.0**119
    after = [w.numpy() for w in run.model.trainable_weights]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # the step changed nothing
    # With a sane scale the next step trains again.
    run.optimizer.dynamic_scale.assign(2.0**10)
    trainer._train_loop(iterator, tf.constant(1))
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(before, run.model.trainable_weights))
