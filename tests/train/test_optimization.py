"""Learning-rate schedules and optimizers."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from segtrain.errors import SegtrainError
from segtrain.train.optimization import build_optimizer, learning_rate_schedule


def test_constant():
    lr = learning_rate_schedule(100, base=0.1)
    assert [float(lr(s)) for s in (0, 50, 99)] == pytest.approx([0.1] * 3)


def test_poly_decay_as_in_deeplab():
    lr = learning_rate_schedule(100, base=0.01, schedule="poly", power=0.9)
    for step in (0, 30, 75, 100):
        assert float(lr(step)) == pytest.approx(0.01 * (1 - step / 100) ** 0.9, rel=1e-5)


def test_cosine():
    lr = learning_rate_schedule(100, base=0.2, schedule="cosine", end=0.02)
    assert float(lr(0)) == pytest.approx(0.2)
    assert float(lr(50)) == pytest.approx(0.02 + 0.18 * 0.5, rel=1e-5)
    assert float(lr(100)) == pytest.approx(0.02, rel=1e-5)


def test_linear_warmup_then_schedule():
    lr = learning_rate_schedule(110, base=0.1, schedule="poly", warmup_steps=10, power=1.0)
    values = [float(lr(s)) for s in range(12)]
    assert values[0] == pytest.approx(0.01) and values[4] == pytest.approx(0.05)
    assert np.all(np.diff(values[:10]) > 0)
    assert values[10] == pytest.approx(0.1) and values[11] == pytest.approx(0.1 * (1 - 1 / 100))


def test_bad_schedule_and_warmup():
    with pytest.raises(SegtrainError, match="learning_rate.schedule='step'"):
        learning_rate_schedule(10, schedule="step")
    with pytest.raises(SegtrainError, match="warmup_steps=20"):
        learning_rate_schedule(10, warmup_steps=20)


@pytest.mark.parametrize("name,cls", [("sgd", keras.optimizers.SGD), ("adam", keras.optimizers.Adam), ("adamw", keras.optimizers.AdamW)])
def test_optimizers(name, cls):
    opt = build_optimizer(10, name=name, momentum=0.8)
    assert type(opt) is cls
    if name == "sgd":
        assert opt.momentum == 0.8
    if name == "adamw":
        assert opt.weight_decay == 0.004


def test_unknown_optimizer():
    with pytest.raises(SegtrainError, match="optimizer.name='rmsprop'"):
        build_optimizer(10, name="rmsprop")
