"""Every built-in model is Keras-serializable: saved as .keras and loaded back, it computes the
same logits and still knows its facts (size divisor, output stride, preprocessing, Grad-CAM layer)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from registry import MODELS
from segtrain.models import SegmentationModel, facts
from segtrain.models.zoo import measured_output_stride
from tests.models import tiny


@pytest.mark.parametrize("name", sorted(tiny.TINY_MODELS))
def test_model_round_trips_through_a_keras_file(tmp_path, name):
    model = MODELS.get(name)(num_classes=3, **tiny.TINY_MODELS[name])
    assert isinstance(model, SegmentationModel)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is SegmentationModel and facts(loaded) == facts(model)
    side = facts(model).size_divisor * -(-40 // facts(model).size_divisor)
    images = np.random.default_rng(0).normal(size=(2, side, side + facts(model).size_divisor, 3)).astype(np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(images)),
                               keras.ops.convert_to_numpy(model(images)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(tiny.TINY_MODELS))
def test_declared_output_stride_is_the_measured_one(name):
    model = MODELS.get(name)(num_classes=3, **tiny.TINY_MODELS[name], input_shape=(64, 64, 3))
    assert facts(model).output_stride == measured_output_stride(model, 64)


def test_facts_live_in_the_config_not_in_glued_attributes():
    model = MODELS.get("fcn8s")(num_classes=3, **tiny.TINY_MODELS["fcn8s"])
    config = model.get_config()
    assert (config["size_divisor"], config["output_stride"], config["preprocessing"], config["cam_layer"]) == (
        32, 32, None, "fc7")
    rebuilt = SegmentationModel.from_config(config)
    assert facts(rebuilt) == facts(model)
