"""XLA: the step compiles under --xla, and a model XLA cannot compile fails with one message."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from registry import MODELS
from segtrain.errors import SegtrainError, SegtrainWarning
from segtrain.train.trainer import train

# XLA compiles for seconds per model on a CPU.
pytestmark = pytest.mark.slow


class HostRound(keras.layers.Layer):
    """Runs a NumPy function on the host: fine for TensorFlow, impossible for XLA."""

    def call(self, x):
        y = tf.numpy_function(np.round, [x], x.dtype)
        return tf.ensure_shape(y, x.shape)


@MODELS.register("host_round_net", override=True)
def host_round_net(num_classes: int) -> keras.Model:
    inputs = keras.Input((None, None, 3))
    x = HostRound()(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(num_classes, 1, dtype="float32")(x))


def test_xla_trains_and_warns_on_cpu(tmp_path, configure):
    configure("train.xla = True", "train.num_image_panels = 0")
    with pytest.warns(SegtrainWarning, match="--xla without a GPU"):
        results = train(str(tmp_path))
    assert np.isfinite(results["loss"])


def test_a_model_xla_cannot_compile_is_one_clear_error(tmp_path, configure):
    configure("train.xla = True", "train.model = 'host_round_net'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SegtrainWarning)
        with pytest.raises(SegtrainError) as e:
            train(str(tmp_path))
    message = str(e.value)
    assert message.startswith("XLA could not compile model 'host_round_net' with loss 'cross_entropy' at precision float32: ")
    assert message.endswith("Train without XLA (drop --xla, or train.xla = False).")
    assert "unsupported operations" in message and "PyFunc" in message
    assert "Traceback" not in message and len(message) < 800
    assert not (tmp_path / "checkpoint").exists()


def test_the_same_model_trains_without_xla(tmp_path, configure):
    configure("train.model = 'host_round_net'", "train.num_image_panels = 0")
    assert np.isfinite(train(str(tmp_path))["loss"])

# Every built-in model under XLA with mixed precision: tests/models/test_training.py.
