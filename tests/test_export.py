"""`segtrain export`: a SavedModel that serves uint8 images and encoded bytes like the trained run."""

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

from segtrain import export as export_lib
from segtrain.errors import SegtrainError
from segtrain.runtime.cluster import Cluster
from tests.conftest import REPO, assert_user_error, segtrain_main

# Sizes that are not multiples of the tiny U-Net's size divisor (4).
RNG = np.random.default_rng(0)
INPUTS = {
    "small": RNG.integers(0, 256, (2, 37, 45, 3), dtype=np.uint8),
    "tall": RNG.integers(0, 256, (1, 64, 48, 3), dtype=np.uint8),
}
MIXED = "--gin_param=train.precision = 'mixed_float16'"


def _export(run, output, *extra):
    result = segtrain_main("export", f"--model_dir={run}", f"--output={output}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """trained_run exported with --probabilities to a numbered version directory."""
    output = tmp_path_factory.mktemp("export") / "segtrain_model" / "1"
    _export(trained_run, output, "--probabilities")
    return str(output)


@pytest.fixture(scope="module")
def exported_mixed(trained_run, tmp_path_factory):
    """trained_run's weights exported from a mixed_float16 model, with --overwrite, over an
    older export (a directory holding old.txt)."""
    output = tmp_path_factory.mktemp("export_mixed") / "1"
    output.mkdir()
    (output / "old.txt").write_text("the previous export")
    try:
        _export(trained_run, output, MIXED, "--overwrite")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return str(output)


@pytest.fixture(scope="module")
def reference(trained_run):
    """{input key: logits} of the run's Inference on the normalised inputs, in this process."""
    from segtrain.commands.trained_run import parse_run, restored

    gin.clear_config()
    try:
        parse_run(str(trained_run))
        experiment, _, _ = restored(str(trained_run))
        inference = experiment.inference()
        return {key: inference.logits(experiment.normalization(tf.constant(batch))).numpy()
                for key, batch in INPUTS.items()}
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def served(exported, exported_mixed, tmp_path_factory):
    """What a fresh Python process (no segtrain imported) gets from both SavedModels."""
    work = tmp_path_factory.mktemp("client")
    np.savez(work / "inputs.npz", **INPUTS)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "export_client.py"), str(work / "inputs.npz"),
         str(work / "results.npz"), exported, exported_mixed],
        cwd=str(work), env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(work / "results.npz"))


def _check_outputs(outputs: dict, logits: np.ndarray, atol: float = 1e-4, probabilities: bool = True):
    assert sorted(outputs) == sorted(export_lib.output_names(probabilities))
    assert outputs["logits"].dtype == np.float32 and outputs["labels"].dtype == np.int32
    assert outputs["logits"].shape == logits.shape
    np.testing.assert_allclose(outputs["logits"], logits, atol=atol, rtol=0)
    np.testing.assert_array_equal(outputs["labels"], np.argmax(outputs["logits"], axis=-1))
    if probabilities:
        assert outputs["probabilities"].dtype == np.float32
        np.testing.assert_allclose(outputs["probabilities"], tf.nn.softmax(outputs["logits"]).numpy(), atol=1e-6)


def test_export_writes_a_saved_model_and_what_its_labels_mean(exported):
    assert os.path.isfile(os.path.join(exported, "saved_model.pb"))
    info = json.load(open(os.path.join(exported, export_lib.METADATA_FILE)))
    assert info["class_names"] == ["background", "circle", "rectangle", "triangle"]
    assert info["num_classes"] == 4 and len(info["palette"]) == 4 and info["palette"][0] == [0, 0, 0]
    assert info["output_names"] == ["logits", "labels", "probabilities"]
    assert info["signatures"]["serving_default"]["inputs"]["images"] == {"dtype": "uint8",
                                                                          "shape": [None, None, None, 3]}
    assert info["step"] == 6 and os.path.basename(info["checkpoint"]) == "ckpt-6"
    assert info["normalization"]["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert info["size_divisor"] == 4 and info["precision"] == "float32"
    # The staging directory was renamed into place: nothing else is left next to it.
    assert os.listdir(os.path.dirname(exported)) == ["1"]


def test_signatures_match_the_runs_inference(exported, reference):
    loaded = tf.saved_model.load(exported)
    assert {"serving_default", "serving_bytes"} <= set(loaded.signatures)
    for key, batch in INPUTS.items():
        outputs = {k: v.numpy() for k, v in loaded.signatures["serving_default"](images=tf.constant(batch)).items()}
        _check_outputs(outputs, reference[key])


@pytest.mark.slow
def test_a_fresh_process_serves_images_and_png_bytes(served, reference):
    assert list(served["0/signatures"]) == ["serving_bytes", "serving_default"]
    assert list(served["0/inputs/serving_default"]) == ["images", "uint8", "[None, None, None, 3]"]
    assert list(served["0/inputs/serving_bytes"]) == ["image_bytes", "string", "[None]"]
    for key in INPUTS:
        for signature in ("images", "bytes"):
            prefix = f"0/{signature}/{key}/"
            _check_outputs({k[len(prefix):]: v for k, v in served.items() if k.startswith(prefix)}, reference[key])
    assert "same size" in str(served["0/mixed_sizes_error"])


@pytest.mark.slow
def test_a_mixed_precision_model_exports_float32_outputs(exported_mixed, served, reference):
    assert json.load(open(os.path.join(exported_mixed, export_lib.METADATA_FILE)))["precision"] == "mixed_float16"
    # The exported graph does compute in float16 (and casts its outputs).
    graph = tf.saved_model.load(exported_mixed).signatures["serving_default"].graph.as_graph_def()
    convolutions = [node.attr["T"].type for f in graph.library.function for node in f.node_def if node.op == "Conv2D"]
    assert tf.float16.as_datatype_enum in convolutions
    for key in INPUTS:
        prefix = f"1/images/{key}/"
        outputs = {k[len(prefix):]: v for k, v in served.items() if k.startswith(prefix)}
        # float16 activations: close to the float32 model, not equal.
        _check_outputs(outputs, reference[key], atol=0.02, probabilities=False)


def test_an_existing_output_is_refused(trained_run, exported):
    before = os.stat(os.path.join(exported, "saved_model.pb")).st_mtime_ns
    result = segtrain_main("export", f"--model_dir={trained_run}", f"--output={exported}")
    assert_user_error(result, f"--output={exported}", "--overwrite")
    assert os.stat(os.path.join(exported, "saved_model.pb")).st_mtime_ns == before


def test_output_is_required(trained_run):
    assert_user_error(segtrain_main("export", f"--model_dir={trained_run}"), "--output")


@pytest.mark.slow
def test_overwrite_replaces_the_old_export(exported_mixed):
    assert sorted(os.listdir(exported_mixed)) == sorted(["assets", "fingerprint.pb", "saved_model.pb", "variables",
                                                         export_lib.METADATA_FILE, "MODEL_CARD.md", "gradcam.png"])
    assert os.listdir(os.path.dirname(exported_mixed)) == ["1"]


def _tiny_model():
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, keras.layers.Conv2D(3, 1, name="logits")(inputs))


def test_a_saved_model_stores_each_weight_once(tmp_path):
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(256, 3, padding="same")(inputs))  # 27 kB of weights
    export_lib.export_model(str(tmp_path / "export"), model, model, lambda v: v / 255.0, 256)
    data = sum(os.path.getsize(p) for p in (tmp_path / "export" / "variables").glob("variables.data-*"))
    weights = sum(np.asarray(w).nbytes for w in model.weights)
    assert weights <= data < 1.1 * weights


def test_export_model_replaces_an_old_export_once_the_new_one_is_complete(tmp_path):
    output = tmp_path / "1"
    output.mkdir()
    (output / "old.txt").write_text("the previous export")
    model = _tiny_model()
    with pytest.raises(SegtrainError, match="--overwrite"):
        export_lib.export_model(str(output), model, model, lambda x: x / 255.0, 3)
    export_lib.export_model(str(output), model, model, lambda x: x / 255.0, 3, overwrite=True)
    assert "old.txt" not in os.listdir(output) and "saved_model.pb" in os.listdir(output)
    assert os.listdir(tmp_path) == ["1"]


def test_a_failed_overwrite_keeps_the_old_export(tmp_path, monkeypatch):
    output = tmp_path / "1"
    output.mkdir()
    (output / "old.txt").write_text("the previous export")
    model = _tiny_model()

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(export_lib, "write_json", disk_full)
    with pytest.raises(SegtrainError) as failed:
        export_lib.export_model(str(output), model, model, lambda x: x / 255.0, 3, overwrite=True)
    assert str(failed.value).startswith(f"Could not write the export {output}: No space left on device. Nothing "
                                        f"was left half-written.")
    assert os.listdir(output) == ["old.txt"]
    assert os.listdir(tmp_path) == ["1"]  # the half-written staging directory is gone


def test_bytes_decode_grey_and_rgba_images_to_rgb(tmp_path):
    model = _tiny_model()
    path = export_lib.export_model(str(tmp_path / "m"), model, model, lambda x: x, 3)
    serve = tf.saved_model.load(path).signatures["serving_bytes"]
    rgb = INPUTS["small"][0]
    grey = tf.io.encode_png(rgb[..., :1])
    rgba = tf.io.encode_png(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1))
    expected = model(rgb[None].astype(np.float32)).numpy()
    np.testing.assert_allclose(serve(image_bytes=tf.stack([rgba]))["logits"].numpy(), expected, atol=1e-5)
    grey_expected = model(np.repeat(rgb[None, ..., :1], 3, -1).astype(np.float32)).numpy()
    np.testing.assert_allclose(serve(image_bytes=tf.stack([grey]))["logits"].numpy(), grey_expected, atol=1e-5)


def test_a_worker_that_is_not_the_chief_writes_nothing(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:20001", "127.0.0.1:20002"]},
                                                "task": {"type": "worker", "index": 1}}))
    output = tmp_path / "1"
    result = _export(trained_run, output)
    assert "chief writes the export" in result.stdout
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("spec, task, chief", [
    ({"worker": ["a:1", "b:1"]}, ("worker", 0), True),
    ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, ("chief", 0), True),
    ({"chief": ["c:1"], "worker": ["a:1"]}, ("worker", 0), False),
])
def test_the_chief_is_the_chief_task_else_worker_0(spec, task, chief):
    assert Cluster(spec, task[0], task[1], "TF_CONFIG", resolver=None).is_chief is chief


def test_the_export_gives_what_predict_writes(exported, trained_run, tmp_path):
    """The same image through `segtrain predict` and through the SavedModel: equal probabilities."""
    from PIL import Image

    pixels = RNG.integers(0, 256, (41, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    result = segtrain_main("predict", f"--model_dir={trained_run}", f"--input={tmp_path / 'photo.png'}",
                           f"--output={tmp_path / 'out'}", "--probabilities")
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = np.load(tmp_path / "out" / "photo_probabilities.npy")
    served = tf.saved_model.load(exported).signatures["serving_default"](images=tf.constant(pixels[None]))
    np.testing.assert_allclose(served["probabilities"].numpy()[0], predicted, atol=1e-5)
    np.testing.assert_array_equal(served["labels"].numpy()[0], np.asarray(Image.open(tmp_path / "out" / "photo.png")))
