"""`segtrain evaluate`: whole, sliding-window and test-time-augmented evaluation at the labels'
own size, over the strategy's replicas, with the results table, JSON and confusion-matrix picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import assert_user_error, copy_run, segtrain_cli, segtrain_main


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """A copy of the session's run, evaluated once the plain way; (model_dir, results)."""
    model_dir = copy_run(trained_run, tmp_path_factory.mktemp("evaluated") / "run")
    result = segtrain_main("evaluate", f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir, json.loads(open(f"{model_dir}/eval_results.json").read()), result.stdout


def test_results_name_every_class_and_the_picture_is_written(evaluated):
    model_dir, results, stdout = evaluated
    names = ["background", "circle", "rectangle", "triangle"]
    assert results["class_names"] == names and results["inference"] == "whole"
    assert set(results["per_class"]) == set(names)
    for i, name in enumerate(names):
        assert results["per_class"][name]["iou"] == results["per_class_iou"][i]
    assert "circle" in stdout and "Wrote" in stdout and "confusion_matrix.png" in stdout
    picture = Image.open(f"{model_dir}/confusion_matrix.png")
    assert picture.format == "PNG" and min(picture.size) > 200


def test_one_scale_without_flip_is_plain_evaluation(evaluated):
    model_dir, results, _ = evaluated
    again = segtrain_main("evaluate", f"--model_dir={model_dir}", "--scales=1.0", "--noflip")
    assert again.returncode == 0, again.stderr[-3000:]
    same = json.loads(open(f"{model_dir}/eval_results.json").read())
    assert same["confusion_matrix"] == results["confusion_matrix"]
    assert same["mean_iou"] == results["mean_iou"]


@pytest.mark.slow  # trains or evaluates a run end to end: the full tier
def test_slide_and_test_time_augmentation_run_and_say_so(evaluated):
    model_dir, results, _ = evaluated
    result = segtrain_main("evaluate", f"--model_dir={model_dir}", "--mode=slide", "--crop_size=32,32",
                           "--stride=20,20", "--scales=0.75,1.25", "--flip")
    assert result.returncode == 0, result.stderr[-3000:]
    augmented = json.loads(open(f"{model_dir}/eval_results.json").read())
    assert augmented["inference"] == "slide 32x32 every 20x20, scales 0.75,1.25 + flip"
    # Every labelled pixel is still counted once, at the label's size.
    assert np.sum(augmented["confusion_matrix"]) == np.sum(results["confusion_matrix"])
    assert 0.0 <= augmented["mean_iou"] <= 1.0


def test_bad_inference_flags_are_named(evaluated):
    model_dir, _, _ = evaluated
    assert_user_error(segtrain_main("evaluate", f"--model_dir={model_dir}", "--mode=slide"), "--crop_size")
    assert_user_error(segtrain_main("evaluate", f"--model_dir={model_dir}", "--scales=0"), "--scales")


def test_metrics_are_computed_at_the_labels_size_when_the_pipeline_resizes(evaluated, configure):
    """pipeline.eval_size resizes the image the model sees; the labels are scored at full size."""
    model_dir, results, _ = evaluated
    result = segtrain_main("evaluate", f"--model_dir={model_dir}", "--gin_param=pipeline.eval_size = (24, 24)")
    assert result.returncode == 0, result.stderr[-3000:]
    resized = json.loads(open(f"{model_dir}/eval_results.json").read())
    # The same labelled pixels as at full resolution, not 24x24 per image.
    assert np.sum(resized["confusion_matrix"]) == np.sum(results["confusion_matrix"])
    assert np.sum(resized["confusion_matrix"], axis=1).tolist() == np.sum(results["confusion_matrix"], axis=1).tolist()


@pytest.mark.slow
def test_evaluation_over_two_replicas_counts_the_same(evaluated, tmp_path):
    model_dir, results, _ = evaluated
    run = copy_run(model_dir, tmp_path / "run")
    result = segtrain_cli("evaluate", f"--model_dir={run}", "--cpu_replicas=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 2 replicas" in result.stdout
    mirrored = json.loads(open(f"{run}/eval_results.json").read())
    assert mirrored["confusion_matrix"] == results["confusion_matrix"]
    assert mirrored["loss"] == pytest.approx(results["loss"], rel=1e-5)


def test_picture_without_matplotlib_is_left_out_with_a_warning(evaluated, monkeypatch, tmp_path):
    import builtins

    from segtrain import plots

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match=r"segtrain\[plots\]"):
        assert not plots.write_confusion_matrix(str(tmp_path / "cm.png"), np.eye(2), ["a", "b"])
    assert not (tmp_path / "cm.png").exists()


def test_a_post_processor_is_reported_with_and_without_it(evaluated):
    model_dir, results, _ = evaluated
    result = segtrain_main("evaluate", f"--model_dir={model_dir}", "--postprocess=dense_crf",
                           "--gin_param=postprocessors.dense_crf.iterations = 2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "+ dense_crf" in result.stdout
    both = json.loads(open(f"{model_dir}/eval_results.json").read())
    # Without it: exactly the plain evaluation. With it: its own matrix over the same pixels.
    assert both["confusion_matrix"] == results["confusion_matrix"]
    post = both["postprocessed"]
    assert post["postprocess"] == "dense_crf" and 0.0 <= post["mean_iou"] <= 1.0
    assert np.sum(post["confusion_matrix"]) == np.sum(results["confusion_matrix"])
    assert set(post["per_class"]) == set(results["class_names"])


def test_an_instance_maker_cannot_be_scored(evaluated):
    model_dir, _, _ = evaluated
    assert_user_error(segtrain_main("evaluate", f"--model_dir={model_dir}", "--postprocess=watershed_instances"),
                      "makes instances", "segtrain predict")
