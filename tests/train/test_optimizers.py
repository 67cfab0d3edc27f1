"""Learning-rate schedules and optimizers: registry kinds with their own gin settings."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from registry import OPTIMIZERS, SCHEDULES
from segtrain.errors import SegtrainError, SegtrainWarning
from segtrain.train.optimizers import build_optimizer, learning_rate_schedule


@pytest.fixture(autouse=True)
def plain_gin(configure):
    configure(tiny=False)


def test_constant():
    lr = learning_rate_schedule(100, base=0.1)
    assert [float(lr(s)) for s in (0, 50, 99)] == pytest.approx([0.1] * 3)


def test_poly_decay_as_in_deeplab(configure):
    configure("schedules.poly.power = 0.9", tiny=False)
    lr = learning_rate_schedule(100, base=0.01, schedule="poly")
    for step in (0, 30, 75, 100):
        assert float(lr(step)) == pytest.approx(0.01 * (1 - step / 100) ** 0.9, rel=1e-5)


def test_cosine(configure):
    configure("schedules.cosine.end = 0.02", tiny=False)
    lr = learning_rate_schedule(100, base=0.2, schedule="cosine")
    assert float(lr(0)) == pytest.approx(0.2)
    assert float(lr(50)) == pytest.approx(0.02 + 0.18 * 0.5, rel=1e-5)
    assert float(lr(100)) == pytest.approx(0.02, rel=1e-5)


def test_linear_warmup_then_schedule(configure):
    configure("schedules.poly.power = 1.0", tiny=False)
    lr = learning_rate_schedule(110, base=0.1, schedule="poly", warmup_steps=10)
    values = [float(lr(s)) for s in range(12)]
    assert values[0] == pytest.approx(0.01) and values[4] == pytest.approx(0.05)
    assert np.all(np.diff(values[:10]) > 0)
    assert values[10] == pytest.approx(0.1) and values[11] == pytest.approx(0.1 * (1 - 1 / 100))


def test_unknown_schedule_and_negative_warmup():
    with pytest.raises(SegtrainError, match="learning_rate.schedule: Unknown schedule 'cosin'. Did you mean 'cosine'"):
        learning_rate_schedule(10, schedule="cosin")
    with pytest.raises(SegtrainError, match="learning_rate.warmup_steps=-1 must be an integer >= 0"):
        learning_rate_schedule(10, warmup_steps=-1)


def test_a_warmup_longer_than_the_run_is_clamped_with_a_warning():
    with pytest.warns(SegtrainWarning, match="learning_rate.warmup_steps=50 is longer than train.num_steps=8: "
                                             "warming up over all 8 steps"):
        lr = learning_rate_schedule(8, base=0.8, schedule="cosine", warmup_steps=50)
    assert [float(lr(s)) for s in range(8)] == pytest.approx([0.1 * (s + 1) for s in range(8)])


@pytest.mark.parametrize("name,cls", [("sgd", keras.optimizers.SGD), ("adam", keras.optimizers.Adam), ("adamw", keras.optimizers.AdamW)])
def test_optimizers(configure, name, cls):
    configure("optimizers.sgd.momentum = 0.8", tiny=False)
    opt = build_optimizer(10, name=name)
    assert type(opt) is cls
    if name == "sgd":
        assert opt.momentum == pytest.approx(0.8)
    if name == "adamw":
        assert opt.weight_decay == 0.004


def test_float16_gets_loss_scaling():
    opt = build_optimizer(10, "mixed_float16", name="sgd")
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer) and isinstance(opt.inner_optimizer, keras.optimizers.SGD)


def test_unknown_optimizer():
    with pytest.raises(SegtrainError, match="optimizer.name: Unknown optimizer 'rmsprop'. Known optimizers: 'adam'"):
        build_optimizer(10, name="rmsprop")


def test_a_plugin_optimizer_and_schedule_by_name(configure):
    @OPTIMIZERS.register("test_lion_like", override=True)
    def test_lion_like(learning_rate, beta_1: float = 0.9):
        """A plugin optimizer."""
        return keras.optimizers.Lion(learning_rate, beta_1=beta_1)

    @SCHEDULES.register("test_halving", override=True)
    def test_halving(base, decay_steps, every: int = 2):
        """A plugin schedule: halves every `every` steps."""
        return lambda step: base * 0.5 ** (step // every)

    configure("optimizer.name = 'test_lion_like'", "optimizers.test_lion_like.beta_1 = 0.5",
              "learning_rate.schedule = 'test_halving'", "schedules.test_halving.every = 3", "learning_rate.base = 0.8",
              tiny=False)
    opt = build_optimizer(10)
    assert isinstance(opt, keras.optimizers.Lion) and opt.beta_1 == 0.5
    assert [float(opt._learning_rate(s)) for s in (0, 3, 6)] == \
        pytest.approx([0.8, 0.4, 0.2])


def test_moved_settings_say_where_they_went(configure):
    with pytest.raises(SegtrainError, match=r"optimizer.momentum is now optimizers.sgd.momentum"):
        configure("optimizer.momentum = 0.9", tiny=False)
    with pytest.raises(SegtrainError, match=r"learning_rate.power is now schedules.poly.power"):
        configure("learning_rate.power = 1.0", tiny=False)
    with pytest.raises(SegtrainError, match=r"deeplabv3.backbone_weights is now backbones.<backbone>.weights"):
        configure("models.deeplabv3.backbone_weights = 'x.h5'", tiny=False)
