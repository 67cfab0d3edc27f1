"""The `segtrain` command end to end, in fresh processes, and its errors."""

from __future__ import annotations

import json

from tests.conftest import assert_user_error as _fails
from tests.conftest import TINY, segtrain_cli
from tests.conftest import tiny_flags as _params


def test_train_then_evaluate(tmp_path):
    model_dir = tmp_path / "run"
    trained = segtrain_cli("train", f"--model_dir={model_dir}", *_params())
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "train step 6/6" in trained.stdout and "eval step 6" in trained.stdout
    assert "tensorboard --logdir" in trained.stdout

    evaluated = segtrain_cli("evaluate", f"--model_dir={model_dir}", "--split=test")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "mean_iou" in evaluated.stdout and "per_class_iou" in evaluated.stdout
    results = json.loads((model_dir / "eval_results.json").read_text())
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "per_class_iou", "dice", "loss"):
        assert key in results
    assert len(results["per_class_iou"]) == 4 and results["split"] == "test"
    assert results["checkpoint"].startswith("ckpt-") and results["step"] in (3, 6)
    assert sum(map(sum, results["confusion_matrix"])) > 0

    latest = segtrain_cli("evaluate", f"--model_dir={model_dir}", "--split=validation", "--checkpoint=latest")
    assert latest.returncode == 0, latest.stderr[-3000:]
    assert json.loads((model_dir / "eval_results.json").read_text())["step"] == 6


def test_gin_file_and_includes(tmp_path):
    conf = tmp_path / "conf"
    (conf / "models").mkdir(parents=True)
    (conf / "models" / "small.gin").write_text("models.unet.depth = 2\nmodels.unet.base_filters = 4\n")
    (conf / "exp.gin").write_text("include 'models/small.gin'\n" + "\n".join(TINY[3:]) + "\n")
    result = segtrain_cli("train", f"--gin_file={conf / 'exp.gin'}", f"--model_dir={tmp_path / 'run'}",
                          "--gin_param=train.num_steps = 3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unet.base_filters = 4" in (tmp_path / "run" / "operative_config.gin").read_text()
    assert "train step 3/3" in result.stdout


def test_list_shows_every_plugin_with_arguments():
    result = segtrain_cli("list")
    assert result.returncode == 0, result.stderr
    for text in ("models:", "unet(num_classes, depth=4, base_filters=64", "encoder_decoder(num_classes",
                 "losses:", "cross_entropy(ignore_label=255)", "focal(ignore_label=255, gamma=2.0",
                 "metrics:", "mean_iou(cm)", "datasets:", "shapes(split='train'"):
        assert text in result.stdout, text


def test_unknown_plugin_name(tmp_path):
    _fails(segtrain_cli("train", f"--model_dir={tmp_path}", *_params("train.model = 'unet3'")),
           "Unknown model 'unet3'", "Did you mean 'unet'", "Known models:")


def test_unknown_gin_binding(tmp_path):
    _fails(segtrain_cli("train", f"--model_dir={tmp_path}", *_params("train.num_step = 5")),
           "Configurable 'train' doesn't have a parameter named 'num_step'", "Did you mean 'train.num_steps'")
    _fails(segtrain_cli("train", f"--model_dir={tmp_path}", *_params("models.unett.depth = 2")),
           "No configurable matching 'models.unett'", "models.unet")


def test_missing_gin_file(tmp_path):
    _fails(segtrain_cli("train", f"--model_dir={tmp_path}", "--gin_file=nope.gin"), "--gin_file=nope.gin: no such file")


def test_missing_model_dir():
    _fails(segtrain_cli("train", *_params()), "--model_dir is required")
    _fails(segtrain_cli("evaluate"), "--model_dir is required")


def test_evaluate_a_directory_that_was_never_trained(tmp_path):
    _fails(segtrain_cli("evaluate", f"--model_dir={tmp_path}"), "operative_config.gin not found")


def test_batch_larger_than_split(tmp_path):
    _fails(segtrain_cli("train", f"--model_dir={tmp_path}", *_params("train.batch_size = 128")),
           "train.batch_size=128 is larger than dataset 'shapes' split 'train' (64 examples)")


def test_unknown_dataset(tmp_path):
    _fails(segtrain_cli("train", f"--model_dir={tmp_path}", *_params("train.dataset = 'shape'")),
           "Unknown dataset 'shape'", "Did you mean 'shapes'")


def test_unknown_command():
    result = segtrain_cli("fit")
    assert result.returncode == 2 and "usage: segtrain" in result.stderr


def test_gin_file_with_a_failing_import(tmp_path):
    conf = tmp_path / "bad.gin"
    conf.write_text("import no_such_package_xyz\ntrain.model = 'unet'\n")
    _fails(segtrain_cli("train", f"--gin_file={conf}", f"--model_dir={tmp_path / 'run'}"),
           "an `import` in a gin file failed", "no_such_package_xyz")


def test_includes_do_not_log_false_errors(tmp_path, caplog):
    from segtrain import config

    conf = tmp_path / "conf"
    (conf / "models").mkdir(parents=True)
    (conf / "models" / "small.gin").write_text("models.unet.depth = 2\n")
    (conf / "exp.gin").write_text("include 'models/small.gin'\n")
    with caplog.at_level("INFO"):
        config.parse([str(conf / "exp.gin")])
    assert not [r for r in caplog.records if "Path not found" in r.getMessage()]
    import gin

    assert gin.query_parameter("unet.depth") == 2
