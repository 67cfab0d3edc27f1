"""TFLite and ONNX exports: every model converts and agrees with its checkpoint, quantisation
costs what it is allowed to, and an export evaluates and predicts like the checkpoint it came from."""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from registry import MODELS
from segtrain.errors import SegtrainError
from segtrain.export import METADATA_FILE, export_model, runtime, serving_functions
from segtrain.inference import Inference
from tests.conftest import assert_user_error, segtrain_main
from tests.models import tiny

FORMATS = ("tflite", "onnx")
# The bounds quantisation is held to on the tiny trained run (labels against the float32 TFLite
# export of the same size, on the validation split; mean IoU change in absolute points).
FLOAT16_LABELS, FLOAT16_MIOU = 0.995, 0.005
INT8_LABELS, INT8_MIOU = 0.90, 0.05


def _normalise(x):
    return (x - 127.5) / 64.0


class Odd(keras.layers.Layer):
    """A layer whose op (the inverse error function) neither TFLite's built-ins nor ONNX have."""

    def call(self, x):
        return tf.raw_ops.Erfinv(x=tf.tanh(x))


def _odd_model():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
    return keras.Model(inputs, Odd(name="odd_layer")(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_op_the_format_cannot_take_fails_at_export_naming_the_layer(fmt, tmp_path):
    model = _odd_model()
    with pytest.raises(SegtrainError, match=f"--format={fmt}.*layer 'odd_layer' \\(op Erfinv\\)"):
        export_model(str(tmp_path / "export"), model, model, _normalise, 3, format=fmt,
                     image_size=(16, 16) if fmt == "tflite" else None)
    assert os.listdir(tmp_path) == []


def test_a_missing_runtime_names_the_install_line(tmp_path, monkeypatch):
    model = MODELS.get("unet")(num_classes=3, **tiny.TINY_MODELS["unet"])
    path = export_model(str(tmp_path / "export"), model, model, _normalise, 3, 4, format="onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(SegtrainError, match='pip install "segtrain\\[onnx\\]"'):
        runtime.load(path)
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    with pytest.raises(SegtrainError, match='--format=onnx needs tf2onnx.*pip install "segtrain\\[onnx\\]"'):
        export_model(str(tmp_path / "again"), model, model, _normalise, 3, 4, format="onnx")


def test_a_path_that_is_not_an_export_is_named(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(SegtrainError, match="not a segtrain export"):
        runtime.load(str(tmp_path / "model.onnx"))
    with pytest.raises(SegtrainError, match="no such file"):
        runtime.load(str(tmp_path / "missing"))


# --- The command line, on the session's tiny trained run -------------------------------------------------
# The tests of the four exports the `exports` fixture writes (about 35 s) are in the slow tier;
# the fast tier keeps the flag checks and the all-or-nothing write.


def _export(run, output, *extra):
    result = segtrain_main("export", f"--model_dir={run}", f"--output={output}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """{name: export directory} of trained_run: ONNX with both evaluations in its card, and TFLite
    float32, float16 and int8 at 32x32."""
    root = tmp_path_factory.mktemp("formats")
    out = {"onnx": root / "onnx"}
    _export(trained_run, out["onnx"], "--format=onnx", "--evaluate_split=validation")
    for name, extra in (("float32", ()), ("float16", ("--quantize=float16",)),
                        ("int8", ("--quantize=int8", "--calibration_images=8"))):
        out[name] = root / name
        _export(trained_run, out[name], "--format=tflite", "--image_size=32,32", *extra)
    return {k: str(v) for k, v in out.items()}


def _evaluate(export, *extra) -> dict:
    result = segtrain_main("evaluate", f"--export={export}", "--split=validation", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    directory = export if os.path.isdir(export) else os.path.dirname(export)
    return json.load(open(os.path.join(directory, "eval_results.json")))


@pytest.mark.slow
def test_an_onnx_export_scores_what_its_checkpoint_scores_and_says_so_in_its_card(exports, trained_run):
    directory = exports["onnx"]
    assert sorted(os.listdir(directory)) == sorted(["MODEL_CARD.md", "confusion_matrix.png", "eval_results.json",
                                                    "gradcam.png", METADATA_FILE, "model.onnx"])
    info = json.load(open(os.path.join(directory, METADATA_FILE)))
    assert info["format"] == "onnx" and info["opset"] == 17 and info["model_file"] == "model.onnx"
    assert info["signatures"]["serving_default"]["inputs"]["images"]["shape"] == [None, None, None, 3]
    assert info["check"]["label_agreement"] == 1.0 and info["check"]["max_logit_difference"] < 1e-4
    checkpoint = segtrain_main("evaluate", f"--model_dir={trained_run}", "--split=validation")
    assert checkpoint.returncode == 0, checkpoint.stderr[-3000:]
    expected = json.load(open(os.path.join(trained_run, "eval_results.json")))
    # --model_dir comes from the export's metadata; the model file works as well as its directory.
    results = _evaluate(os.path.join(directory, "model.onnx"))
    for key in ("loss", "pixel_accuracy", "mean_iou"):
        assert results[key] == pytest.approx(expected[key], abs=1e-5), key
    assert results["export"].endswith("model.onnx") and results["step"] == expected["step"]
    card = open(os.path.join(directory, "MODEL_CARD.md")).read()
    assert "| metric | checkpoint | export | change |" in card
    assert f"| mean_iou | {expected['mean_iou']:.4f} | {results['mean_iou']:.4f} |" in card
    for fragment in ("| 1 | circle |", "![Grad-CAM](gradcam.png)", "![confusion matrix](confusion_matrix.png)",
                     "input `images`: uint8 RGB [B, any, any, 3]", "--format=onnx --evaluate_split=validation",
                     "labels agree on 100.00% of pixels"):
        assert fragment in card, fragment


@pytest.mark.slow
def test_quantised_tflite_exports_stay_within_their_bounds(exports):
    """float16 and int8 against float32 at the same input size: labels at export, mIoU on validation."""
    results = {name: _evaluate(exports[name]) for name in ("float32", "float16", "int8")}
    checks = {name: json.load(open(os.path.join(exports[name], METADATA_FILE)))["check"] for name in results}
    assert checks["float32"]["label_agreement"] >= 0.995
    assert checks["float16"]["label_agreement"] >= FLOAT16_LABELS
    assert checks["int8"]["label_agreement"] >= INT8_LABELS
    assert abs(results["float16"]["mean_iou"] - results["float32"]["mean_iou"]) <= FLOAT16_MIOU
    assert abs(results["int8"]["mean_iou"] - results["float32"]["mean_iou"]) <= INT8_MIOU
    sizes = {name: os.path.getsize(os.path.join(exports[name], "model.tflite")) for name in results}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]


def test_int8_calibration_is_repeatable():
    from segtrain.export import tflite

    model = MODELS.get("unet")(num_classes=3, **tiny.TINY_MODELS["unet"])
    serve = serving_functions(Inference(model, 3, 4).logits, _normalise, encoded=False)["serving_default"]
    images = list(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    files = [tflite.convert(serve, (16, 16), "int8", lambda: iter(images)) for _ in range(2)]
    assert files[0] == files[1]


@pytest.mark.slow
def test_an_int8_export_says_what_it_is(exports):
    info = json.load(open(os.path.join(exports["int8"], METADATA_FILE)))
    assert info["quantize"] == "int8" and info["image_size"] == [32, 32]
    # Without --evaluate_split the card shows the run's own evaluation of the exported checkpoint.
    card = open(os.path.join(exports["int8"], "MODEL_CARD.md")).read()
    assert "the run's own evaluation at step 6" in card and "| metric | checkpoint |" in card
    assert "TFLite (int8) export" in card and "resized to 32x32" in card
    assert info["signatures"]["serving_default"]["inputs"]["images"] == {"dtype": "uint8", "shape": [None, 32, 32, 3]}


@pytest.mark.slow
def test_a_tflite_export_runs_in_the_litert_interpreter_by_its_signature(exports):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=os.path.join(exports["float32"], "model.tflite"))
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["images"],
                                                                    "outputs": ["labels", "logits"]}}
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    outputs = interpreter.get_signature_runner()(images=images)
    assert outputs["logits"].shape == (3, 32, 32, 4) and outputs["labels"].shape == (3, 32, 32)


@pytest.mark.slow
def test_without_litert_a_tflite_export_runs_in_tensorflows_interpreter(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    assert runtime.interpreter_class() is tf.lite.Interpreter
    exported = runtime.load(exports["float32"])
    assert exported(np.zeros((1, 40, 36, 3), np.uint8))["labels"].shape == (1, 40, 36)


@pytest.mark.slow
def test_predict_with_an_export_writes_the_checkpoints_masks(exports, trained_run, tmp_path):
    rng = np.random.default_rng(1)
    for i, size in enumerate([(37, 45), (40, 40)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    exported = segtrain_main("predict", f"--export={exports['onnx']}", f"--input={tmp_path}/*.png",
                             f"--output={tmp_path / 'export'}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    checkpoint = segtrain_main("predict", f"--model_dir={trained_run}", f"--input={tmp_path}/*.png",
                               f"--output={tmp_path / 'checkpoint'}")
    assert checkpoint.returncode == 0, checkpoint.stderr[-3000:]
    for i in range(2):
        a, b = (np.asarray(Image.open(tmp_path / d / f"{i}.png")) for d in ("export", "checkpoint"))
        assert a.shape == b.shape and np.mean(a == b) >= 0.995
    summary = json.load(open(tmp_path / "export" / "predictions.json"))
    assert summary["export"] == exports["onnx"] and "ONNX export" in summary["inference"]


@pytest.mark.parametrize("args, fragments", [
    (("--format=onnx", "--quantize=int8"), ("--quantize=int8 is for --format=tflite",)),
    (("--format=onnx", "--image_size=32,32"), ("--image_size is for --format=tflite",)),
    (("--format=tflite", "--image_size=32"), ("--image_size=32: give H,W",)),
    (("--format=saved_model", "--opset=13"), ("--opset is for --format=onnx",)),
])
def test_bad_export_flags_are_named(trained_run, tmp_path, args, fragments):
    assert_user_error(segtrain_main("export", f"--model_dir={trained_run}", f"--output={tmp_path / 'e'}", *args),
                      *fragments)
    assert not os.path.exists(tmp_path / "e")


@pytest.mark.slow
def test_an_export_runs_as_it_was_exported(exports):
    assert_user_error(segtrain_main("evaluate", f"--export={exports['onnx']}", "--scales=0.5,1"),
                      "--scales", "an export runs as it was exported")


@pytest.mark.slow
def test_a_mixed_precision_run_exports_a_float32_model(trained_run, tmp_path):
    """TFLite has no half-precision convolution: the weights (float32 in a mixed-precision run)
    go into a model built at float32."""
    output = tmp_path / "mixed"
    _export(trained_run, output, "--format=tflite", "--gin_param=train.precision = 'mixed_bfloat16'")
    info = json.load(open(output / METADATA_FILE))
    assert info["trained_precision"] == "mixed_bfloat16" and info["precision"] == "float32"
    assert info["check"]["label_agreement"] >= 0.995


def test_an_export_that_fails_its_check_writes_nothing(trained_run, tmp_path, monkeypatch):
    from segtrain.commands import export as command

    def broken(*args, **kwargs):
        raise SegtrainError("the converted model disagrees")

    monkeypatch.setattr(command, "_check", broken)
    assert_user_error(segtrain_main("export", f"--model_dir={trained_run}", f"--output={tmp_path / 'e'}",
                                    "--format=onnx"), "disagrees")
    assert os.listdir(tmp_path) == []
