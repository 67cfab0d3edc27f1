"""The model a run evaluated is the model it saved: in-run results against the saved artefacts."""

from __future__ import annotations

import json
import os

import gin
import numpy as np
import pytest

from tests.conftest import segtrain_main

KEYS = ("loss", "pixel_accuracy", "mean_accuracy", "mean_iou")


def _evaluate(model_dir, checkpoint: str) -> dict:
    result = segtrain_main("evaluate", f"--model_dir={model_dir}", "--split=validation", f"--checkpoint={checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((model_dir / "eval_results.json").read_text())


def _export_metrics(model_dir, output) -> dict:
    """Pixel accuracy and mean IoU of the SavedModel `segtrain export` writes, on the run's
    validation split (uint8 images in, as a server sends them)."""
    import tensorflow as tf

    from segtrain import metrics as M
    from segtrain.commands.trained_run import parse_run
    from segtrain.experiment import Experiment

    result = segtrain_main("export", f"--model_dir={model_dir}", f"--output={output}", "--checkpoint=latest")
    assert result.returncode == 0, result.stderr[-3000:]
    served = tf.saved_model.load(str(output)).signatures["serving_default"]
    parse_run(str(model_dir))
    try:
        dataset, info = Experiment().read("validation")
        cm = np.zeros([info.num_classes] * 2, np.int64)
        for example in dataset:
            labels = served(images=example["image"][None])["labels"][0]
            cm += M.confusion_matrix(tf.cast(example["label"], tf.int32), labels, info.num_classes,
                                     info.ignore_label).numpy()
    finally:
        gin.clear_config()
    return M.compute(cm, ("pixel_accuracy", "mean_iou"))


def assert_evaluated_model_is_saved(model_dir, scratch) -> None:
    """The last in-run evaluation equals `segtrain evaluate` of the latest checkpoint and of
    the export; the best checkpoint's evaluation equals its recorded value (float tolerance:
    the run evaluated over its replicas, these on one device)."""
    in_run = json.loads((model_dir / "eval_results_validation.json").read_text())
    latest = _evaluate(model_dir, "latest")
    assert latest["step"] == in_run["step"]
    for key in KEYS:
        assert latest[key] == pytest.approx(in_run[key], rel=1e-5, abs=1e-6), key
    best = json.loads((model_dir / "best" / "best.json").read_text())
    assert _evaluate(model_dir, "best")[best["metric"]] == pytest.approx(best["value"], rel=1e-5, abs=1e-6)
    exported = _export_metrics(model_dir, os.path.join(scratch, "export"))
    for key, value in exported.items():
        assert value == pytest.approx(in_run[key], rel=1e-5, abs=1e-6), key
