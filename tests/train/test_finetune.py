"""Fine-tuning settings, checked on what the optimizer actually applies: learning-rate multipliers
per part, layer-wise decay, no weight decay on normalisation and biases, a frozen backbone start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from registry import MODELS
from segtrain.errors import SegtrainError
from segtrain.train.optimizers import build_optimizer, norm_and_bias
from tests.conftest import REPO
from tests.models import tiny

LR = 0.1


def model():
    keras.utils.set_random_seed(0)
    return MODELS.get("deeplabv3")(num_classes=2, **tiny.TINY_MODELS["deeplabv3"])


def step(optimizer, net, gradient: float = 1.0):
    """One update with every gradient ``gradient``; returns {variable path: applied change}."""
    before = {v.path: keras.ops.convert_to_numpy(v).copy() for v in net.trainable_weights}
    grads = [tf.fill(v.shape, gradient) for v in net.trainable_weights]
    optimizer.apply_gradients(zip(grads, net.trainable_weights))
    return {v.path: keras.ops.convert_to_numpy(v) - before[v.path] for v in net.trainable_weights}


def optimizer_for(net, configure, *bindings, name="sgd"):
    configure(f"optimizer.name = '{name}'", "optimizers.sgd.momentum = 0.0", f"learning_rate.base = {LR}",
              *bindings, tiny=False)
    optimizer = build_optimizer(10, model=net)
    optimizer.build(net.trainable_weights)
    return optimizer


def backbone_paths(net):
    return {v.path for v in net.get_layer("backbone").trainable_weights}


def test_the_backbone_learns_at_its_multiplier(configure):
    net = model()
    changes = step(optimizer_for(net, configure, "optimizer.lr_multipliers = {'backbone': 0.1}"), net)
    backbone = backbone_paths(net)
    assert backbone and len(backbone) < len(changes)
    for path, change in changes.items():
        np.testing.assert_allclose(change, -LR * (0.1 if path in backbone else 1.0), rtol=1e-5, err_msg=path)


def test_a_pattern_names_a_part_and_the_first_match_wins(configure):
    net = model()
    changes = step(optimizer_for(net, configure, "optimizer.lr_multipliers = {'aspp.rate6': 0.0, 'aspp': 2.0}",
                                 name="adam"), net)
    for path, change in changes.items():
        if "aspp.rate6" in path:
            assert not change.any(), path
        elif "aspp" in path:  # Adam's first step moves by the rate, whatever the gradient's size
            np.testing.assert_allclose(np.abs(change), 2 * LR, rtol=1e-3, err_msg=path)
        else:
            np.testing.assert_allclose(np.abs(change), LR, rtol=1e-3, err_msg=path)


def test_no_weight_decay_on_normalisation_and_biases_by_default(configure):
    net = model()
    changes = step(optimizer_for(net, configure, "optimizers.sgd.weight_decay = 0.5"), net, gradient=0.0)
    exempt = {v.path for v in norm_and_bias(net)}
    assert any("bn/gamma" in p for p in exempt) and any(p.endswith("/bias") for p in exempt)
    for v in net.trainable_weights:
        if v.path in exempt:
            assert not changes[v.path].any(), v.path
        else:  # decoupled decay: w -= lr * wd * w
            after = keras.ops.convert_to_numpy(v)
            np.testing.assert_allclose(changes[v.path], -LR * 0.5 * after / (1 - LR * 0.5), rtol=1e-4, atol=1e-7)
    net = model()
    changes = step(optimizer_for(net, configure, "optimizers.sgd.weight_decay = 0.5",
                                 "optimizer.decay_norm_and_bias = True"), net, gradient=0.0)
    assert all(changes[p].any() for p in exempt if "gamma" in p)


def test_the_backbone_stays_frozen_for_its_first_steps_and_then_trains(configure):
    net = model()
    optimizer = optimizer_for(net, configure, "optimizer.freeze_backbone_steps = 2",
                              "optimizers.sgd.weight_decay = 0.5", "optimizer.lr_multipliers = {'backbone': 0.5}")
    backbone = backbone_paths(net)
    for _ in range(2):
        changes = step(optimizer, net)
        assert not any(changes[p].any() for p in backbone)
        assert all(changes[p].any() for p in changes if p not in backbone)
    changes = step(optimizer, net, gradient=0.0)  # only the weight decay moves, at the backbone's rate
    kernel = next(v for v in net.get_layer("backbone").trainable_weights if v.path.endswith("conv1_conv/kernel"))
    after = keras.ops.convert_to_numpy(kernel)
    np.testing.assert_allclose(changes[kernel.path], -LR * 0.5 * 0.5 * after / (1 - LR * 0.5 * 0.5), rtol=1e-4, atol=1e-7)


def test_layer_decay_lowers_the_rate_stage_by_stage_towards_the_stem(configure):
    net = model()
    changes = step(optimizer_for(net, configure, "optimizer.layer_decay = 0.5"), net)
    rate = {path: float(np.abs(change).max()) for path, change in changes.items()}
    # resnet_tiny: stages at strides 2 (conv1), 4 (conv2), 8, 16, 32 (conv5); the head at 1.
    for prefix, depth in (("conv1_conv", 5), ("conv2_block1_1_conv", 4), ("conv3_block1_1_conv", 3),
                          ("conv4_block1_1_conv", 2), ("conv5_block1_1_conv", 1)):
        (path,) = [p for p in rate if p.endswith(f"{prefix}/kernel")]
        assert rate[path] == pytest.approx(LR * 0.5 ** depth, rel=1e-5), path
    assert rate[next(p for p in rate if "aspp.project" in p)] == pytest.approx(LR, rel=1e-5)


def test_settings_that_need_a_backbone_say_so(configure):
    plain = MODELS.get("unet")(num_classes=2, **tiny.TINY_MODELS["unet"])
    with pytest.raises(SegtrainError, match=r"optimizer.freeze_backbone_steps: model 'unet' has no nested 'backbone'"):
        optimizer_for(plain, configure, "optimizer.freeze_backbone_steps = 3")


@pytest.mark.slow
def test_two_replicas_apply_the_same_multipliers():
    result = subprocess.run([sys.executable, "-m", "tests.train.test_finetune"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2 and out["agree"]
    # Two steps: the backbone frozen in the first, at a tenth of the rate in the second.
    assert out["backbone"] == pytest.approx(-LR * 0.1, rel=1e-5) and out["head"] == pytest.approx(-2 * LR, rel=1e-5)


if __name__ == "__main__":  # MirroredStrategy over two logical CPUs: every replica's copy of every variable
    import gin

    from segtrain.commands.configure import parse_config
    from segtrain.runtime.distribute import split_cpu

    strategy = tf.distribute.MirroredStrategy(split_cpu(2))
    parse_config([], ["optimizer.name = 'sgd'", "optimizers.sgd.momentum = 0.0", f"learning_rate.base = {LR}",
                      "optimizer.lr_multipliers = {'backbone': 0.1}", "optimizer.freeze_backbone_steps = 1"])
    with strategy.scope():
        net = model()
        optimizer = build_optimizer(10, model=net)
        optimizer.build(net.trainable_weights)
    before = [keras.ops.convert_to_numpy(v).copy() for v in net.trainable_weights]

    @tf.function
    def train_step():
        def replica_step():
            grads = [tf.ones(v.shape) / 2 for v in net.trainable_weights]  # summed over 2 replicas: 1
            optimizer.apply_gradients(zip(grads, net.trainable_weights))
        strategy.run(replica_step)

    train_step()  # the frozen step
    frozen = all(np.array_equal(keras.ops.convert_to_numpy(v), b)
                 for v, b in zip(net.get_layer("backbone").trainable_weights, before))
    train_step()
    backbone = {v.path for v in net.get_layer("backbone").trainable_weights}
    agree, change = True, {}
    for v, b in zip(net.trainable_weights, before):
        copies = [c.numpy() for c in strategy.experimental_local_results(v.value)]
        agree &= all(np.array_equal(copies[0], c) for c in copies[1:])
        change["backbone" if v.path in backbone else "head"] = float((copies[0] - b).flat[0])
    gin.clear_config()
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "agree": bool(agree and frozen), **change}))
