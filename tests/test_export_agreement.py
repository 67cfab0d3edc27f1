"""Every registered model (tiny form, random weights) exports to TFLite and ONNX, and the exports
compute what the Keras model computes. (Apart from tests/test_export_formats.py so that the two
files run side by side under `--dist loadfile`.)"""

from __future__ import annotations

import numpy as np
import pytest

from registry import MODELS
from segtrain.export import export_model, runtime, serving_functions
from segtrain.inference import Inference
from segtrain.models import facts
from tests.models import tiny


def _normalise(x):
    return (x - 127.5) / 64.0


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "unet" else pytest.mark.slow)
                                  for n in sorted(tiny.TINY_MODELS)])
def test_every_model_converts_and_agrees_with_its_keras_model(name, tmp_path):
    """Float exports (TFLite float32 and ONNX) give the Keras model's logits within float
    tolerance and its labels on >= 99.5% of pixels, at batch 1 and 2, and (ONNX) at sizes that
    are not multiples of the size divisor."""
    model = MODELS.get(name)(num_classes=3, **tiny.TINY_MODELS[name])
    divisor = facts(model).size_divisor
    inference = Inference(model, 3, divisor)
    side = divisor * -(-40 // divisor)
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    odd = rng.integers(0, 256, (1, side - 3, side + 5, 3), dtype=np.uint8)
    serve = serving_functions(inference.logits, _normalise, encoded=False)["serving_default"]
    for fmt, batches in (("tflite", [square]), ("onnx", [square, odd])):
        path = export_model(str(tmp_path / fmt), model, inference.logits, _normalise, 3, divisor, format=fmt,
                            image_size=(side, side) if fmt == "tflite" else None)
        exported = runtime.load(path)
        for batch in batches:
            reference = {k: v.numpy() for k, v in serve(batch).items()}
            got = exported(batch)
            assert got["logits"].shape == reference["logits"].shape and got["logits"].dtype == np.float32
            scale = max(1.0, float(np.abs(reference["logits"]).max()))
            np.testing.assert_allclose(got["logits"], reference["logits"], atol=1e-4 * scale, rtol=0, err_msg=fmt)
            assert np.mean(got["labels"] == reference["labels"]) >= 0.995, fmt
