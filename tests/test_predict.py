"""`segtrain predict`: masks, colour masks, overlays and probabilities of your own images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import assert_user_error, segtrain_main


@pytest.fixture
def photos(tmp_path):
    """RGB JPEG, grey PNG and RGBA PNG of different sizes, two RGB PNGs of one size, one broken file."""
    rng = np.random.default_rng(0)
    d = tmp_path / "photos"
    d.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(d / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (29, 37), np.uint8)).save(d / "grey.png")
    Image.fromarray(rng.integers(0, 255, (33, 61, 4), np.uint8)).save(d / "rgba.png")
    for name in ("same1", "same2", "same3"):
        Image.fromarray(rng.integers(0, 255, (48, 32, 3), np.uint8)).save(d / f"{name}.png")
    (d / "broken.png").write_bytes(b"\x89PNG but not really")
    return d


GOOD = {"rgb": (40, 50), "grey": (29, 37), "rgba": (33, 61), "same1": (48, 32), "same2": (48, 32), "same3": (48, 32)}


def _restored(run):
    from segtrain.commands.trained_run import parse_run, restored

    parse_run(str(run))
    experiment, _, _ = restored(str(run))
    return experiment


def test_predict_writes_every_output_and_skips_an_unreadable_file(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    result = segtrain_main("predict", f"--model_dir={trained_run}", f"--input={photos}", f"--output={out}",
                           "--probabilities", "--batch_size=2")
    assert result.returncode == 0, result.stderr
    assert "broken.png: not a readable image" in result.stdout  # reported by name, then skipped
    assert "predict image 6/6" in result.stdout  # the progress line
    summary = json.loads((out / "predictions.json").read_text())
    assert set(summary["skipped"]) == {str(photos / "broken.png")}
    assert len(summary["written"]) == 6

    experiment = _restored(trained_run)
    palette = experiment.info.palette_array()
    inference = experiment.inference()
    for name, (h, w) in GOOD.items():
        labels = np.asarray(Image.open(out / f"{name}.png"))
        colour = np.asarray(Image.open(out / f"{name}_color.png"))
        overlay = Image.open(out / f"{name}_overlay.jpg")
        probs = np.load(out / f"{name}_probabilities.npy")
        assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < experiment.info.num_classes
        np.testing.assert_array_equal(colour, palette[labels])
        assert overlay.size == (w, h) and overlay.mode == "RGB"
        assert probs.shape == (h, w, experiment.info.num_classes) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(np.argmax(probs, -1), labels)
        # The same probabilities as the model through Inference, image by image (batching and the
        # grey / RGBA conversion change nothing).
        source = next(photos.glob(f"{name}.*"))
        pixels = np.asarray(Image.open(source).convert("RGB"))[None]
        expected = inference.probabilities(experiment.normalization(tf.constant(pixels))).numpy()[0]
        np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary file left


def test_strict_stops_at_the_unreadable_file_and_writes_nothing(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    result = segtrain_main("predict", f"--model_dir={trained_run}", f"--input={photos}", f"--output={out}", "--strict")
    assert_user_error(result, "broken.png", "--strict")
    assert not out.exists()


@pytest.mark.slow  # trains or evaluates a run end to end: the full tier
def test_globs_lists_and_slide_with_test_time_augmentation(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    result = segtrain_main("predict", f"--model_dir={trained_run}", f"--input={photos}/same*.png,{photos}/rgb.jpg",
                           f"--output={out}", "--mode=slide", "--crop_size=32,32", "--stride=16,16",
                           "--scales=0.75,1.0", "--flip")
    assert result.returncode == 0, result.stderr
    assert "slide 32x32 every 16x16, scales 0.75,1 + flip" in result.stdout
    assert sorted(f for f in os.listdir(out) if f.endswith("_color.png")) == [
        "rgb_color.png", "same1_color.png", "same2_color.png", "same3_color.png"]


@pytest.mark.parametrize("argument,fragment", [
    ("--input=/no/such/dir", "--input=/no/such/dir: no such file"),
    ("--input=/tmp/*.no_such_extension", "matches no file"),
    ("--mode=slide", "--mode=slide needs --crop_size"),
    ("--postprocess=no_such_thing", "no_such_thing"),
])
def test_bad_input_and_flags_are_named(trained_run, photos, tmp_path, argument, fragment):
    args = [f"--model_dir={trained_run}", f"--input={photos}", f"--output={tmp_path / 'out'}", argument]
    assert_user_error(segtrain_main("predict", *args), fragment)


def test_output_is_required_and_nothing_readable_is_an_error(trained_run, tmp_path):
    assert_user_error(segtrain_main("predict", f"--model_dir={trained_run}", f"--input={tmp_path}"), "--output")
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert_user_error(segtrain_main("predict", f"--model_dir={trained_run}", f"--input={tmp_path / 'bad.png'}",
                                    f"--output={tmp_path / 'out'}"), "No image of --input could be read")


def test_output_names_stay_unique():
    from segtrain.commands.predict import output_names

    names = output_names(["a/x.png", "b/x.jpg", "c/y.png", "b/x.png"])
    assert len(set(names.values())) == 4 and names["c/y.png"] == "y"


def test_post_processors_refine_masks_and_write_instances(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    result = segtrain_main("predict", f"--model_dir={trained_run}", f"--input={photos}/rgb.jpg", f"--output={out}",
                           "--postprocess=watershed_instances",
                           "--gin_param=postprocessors.watershed_instances.min_size = 1")
    assert result.returncode == 0, result.stderr[-3000:]
    instances = sorted(out.glob("rgb_instances_*.png"))
    labels = np.asarray(Image.open(out / "rgb.png"))
    for path in instances:
        ids = np.asarray(Image.open(path))
        assert ids.shape == labels.shape
        class_name = path.stem.removeprefix("rgb_instances_")
        index = ["background", "circle", "rectangle", "triangle"].index(class_name)
        assert ((ids > 0) <= (labels == index)).all()  # instances lie inside their class's mask
    assert {p.stem.removeprefix("rgb_instances_") for p in instances} <= {"circle", "rectangle", "triangle"}
    crf = segtrain_main("predict", f"--model_dir={trained_run}", f"--input={photos}/rgb.jpg",
                        f"--output={tmp_path / 'crf'}", "--postprocess=dense_crf", "--probabilities")
    assert crf.returncode == 0, crf.stderr[-3000:]
    refined = np.load(tmp_path / "crf" / "rgb_probabilities.npy")
    np.testing.assert_allclose(refined.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(np.argmax(refined, -1), np.asarray(Image.open(tmp_path / "crf" / "rgb.png")))
