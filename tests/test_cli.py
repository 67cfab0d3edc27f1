"""The `segtrain` command: end to end in a fresh process, its errors in this one, and flags that
belong to their subcommand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY, copy_run, segtrain_cli, segtrain_main
from tests.conftest import assert_user_error as _fails
from tests.conftest import tiny_flags as _params
from tests.train.test_profiler import _step_markers, _traces, assert_profiler_stopped


@pytest.mark.slow  # trains or evaluates a run end to end: the full tier
def test_evaluate_writes_every_metric(trained_run, tmp_path):
    model_dir = copy_run(trained_run, tmp_path / "run")
    evaluated = segtrain_main("evaluate", f"--model_dir={model_dir}", "--split=test")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "mean_iou" in evaluated.stdout and "per_class_iou" in evaluated.stdout
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "per_class_iou", "dice", "loss"):
        assert key in results
    assert len(results["per_class_iou"]) == 4 and results["split"] == "test"
    assert results["checkpoint"].startswith("ckpt-") and results["step"] in (3, 6)
    assert sum(map(sum, results["confusion_matrix"])) > 0

    latest = segtrain_main("evaluate", f"--model_dir={model_dir}", "--split=validation", "--checkpoint=latest",
                           "--batch_size=3")
    assert latest.returncode == 0, latest.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text())["step"] == 6


@pytest.mark.slow
def test_train_in_process_with_a_gin_file_and_includes(tmp_path):
    conf = tmp_path / "conf"
    (conf / "models").mkdir(parents=True)
    (conf / "models" / "small.gin").write_text("models.unet.depth = 2\nmodels.unet.base_filters = 4\n")
    (conf / "exp.gin").write_text("include 'models/small.gin'\n" + "\n".join(TINY[3:]) + "\n")
    result = segtrain_main("train", f"--gin_file={conf / 'exp.gin'}", f"--model_dir={tmp_path / 'run'}",
                           "--gin_param=train.num_steps = 3", "--gin_param=train.num_image_panels = 0",
                           "--profile_steps=2,3")
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "run" / "operative_config.gin").read_text()
    assert "unet.base_filters = 4" in config and "train.profile_steps = (2, 3)" in config
    assert "train step 3/3" in result.stdout and "tensorboard --logdir" in result.stdout
    # --profile_steps: a trace of steps 2..3 under the run's TensorBoard directory.
    [trace] = _traces(tmp_path / "run")
    assert _step_markers(trace) == [3]  # windows: step 1, then steps 2..3 traced
    assert "Profiled steps 2..3" in result.stdout
    assert_profiler_stopped(tmp_path)


@pytest.mark.slow
def test_the_quickstart_trains_as_a_short_smoke_test_then_evaluates(tmp_path):
    """Both README commands in fresh processes. A warm-up longer than a short run is shortened to
    it, with one warning line."""
    model_dir = tmp_path / "run"
    trained = segtrain_cli("train", "--gin_file=gin/quickstart.gin", "--gin_param=train.num_steps=8",
                           "--gin_param=datasets.shapes.num_validation = 16",
                           "--gin_param=datasets.shapes.num_test = 16", f"--model_dir={model_dir}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert ("warning: learning_rate.warmup_steps=75 is longer than train.num_steps=8: warming up over all 8 "
            "steps.") in trained.stderr
    assert "train step 8/8" in trained.stdout and "eval step 8" in trained.stdout
    assert "tensorboard --logdir" in trained.stdout and (model_dir / "ckpt-8.index").exists()

    evaluated = segtrain_cli("evaluate", f"--model_dir={model_dir}", "--split=test")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "mean_iou" in evaluated.stdout and "per_class_iou" in evaluated.stdout
    results = json.loads((model_dir / "eval_results.json").read_text())
    assert results["split"] == "test" and results["checkpoint"].startswith("ckpt-")


def test_list_shows_every_plugin_with_arguments():
    result = segtrain_main("list")
    assert result.returncode == 0, result.stderr
    for text in ("models:", "unet(num_classes, depth=4, base_filters=64", "encoder_decoder(num_classes",
                 "backbones:", "resnet50(weights=None, freeze=False, freeze_batch_norm=False, batch_norm_momentum=None)",
                 "losses:", "cross_entropy(ignore_label=255, label_smoothing=0.0, top_k_percent_pixels=1.0, multilabel=False)",
                 "lovasz_softmax(", "lovasz_hinge(", "tversky(", "focal(ignore_label=255, gamma=2.0",
                 "metrics:", "mean_iou(cm)", "datasets:", "shapes(split='train'",
                 "voc2012_aug(split='train', data_dir=None, source_dir=None, skip_damaged_records=False, sbd_dir=None)",
                 "optimizers:", "sgd(learning_rate, momentum=0.9", "schedules:", "poly(base, decay_steps, end=0.0"):
        assert text in result.stdout, text
    models = segtrain_main("list", "--models")
    assert "unet(" in models.stdout and "losses:" not in models.stdout


def test_unknown_plugin_name(tmp_path):
    _fails(segtrain_main("train", f"--model_dir={tmp_path}", *_params("train.model = 'unet3'")),
           "Unknown model 'unet3'", "Did you mean 'unet'", "Known models:")


def test_unknown_configurable_suggests_the_closest(tmp_path):
    _fails(segtrain_main("train", f"--model_dir={tmp_path}", *_params("pipelin.crop_size = (32, 32)")),
           "No configurable matching 'pipelin'. Did you mean 'pipeline'?")


def test_a_bad_pipeline_setting_is_one_error_naming_the_binding(tmp_path):
    _fails(segtrain_main("train", f"--model_dir={tmp_path}", *_params("pipeline.hue = 0.7")),
           "pipeline.hue must be a number in [0, 0.5], got 0.7.")


def test_unknown_gin_binding(tmp_path):
    _fails(segtrain_main("train", f"--model_dir={tmp_path}", *_params("train.num_step = 5")),
           "Configurable 'train' doesn't have a parameter named 'num_step'", "Did you mean 'train.num_steps'")
    _fails(segtrain_main("train", f"--model_dir={tmp_path}", *_params("models.unett.depth = 2")),
           "No configurable matching 'models.unett'", "models.unet")


def test_a_binding_of_what_segtrain_passes_itself_is_refused(tmp_path):
    _fails(segtrain_main("train", f"--model_dir={tmp_path}", *_params("models.unet.num_classes = 3")),
           "models.unet.num_classes is passed by segtrain itself", "remove that binding")


def test_missing_gin_file(tmp_path):
    _fails(segtrain_main("train", f"--model_dir={tmp_path}", "--gin_file=nope.gin"), "--gin_file=nope.gin: no such file")


def test_missing_model_dir():
    _fails(segtrain_main("train", *_params()), "--model_dir is required")
    _fails(segtrain_main("evaluate"), "--model_dir is required")


def test_evaluate_a_directory_that_was_never_trained(tmp_path):
    _fails(segtrain_main("evaluate", f"--model_dir={tmp_path}"), "operative_config.gin not found")


def test_batch_larger_than_split(tmp_path):
    _fails(segtrain_main("train", f"--model_dir={tmp_path}", *_params("train.batch_size = 128")),
           "train.batch_size=128 is larger than dataset 'shapes' split 'train' (64 examples)")


def test_unknown_dataset(tmp_path):
    _fails(segtrain_main("train", f"--model_dir={tmp_path}", *_params("train.dataset = 'shape'")),
           "Unknown dataset 'shape'", "Did you mean 'shapes'")


def test_unknown_command_and_no_command():
    for args in (("fit",), ()):
        result = segtrain_main(*args)
        assert result.returncode == 2 and "usage: segtrain {train|doctor|tune|evaluate|predict|export|explain|prepare|data-service|list|weights}" in result.stderr


_LIGHT_PATHS_PROBE = """
import sys
from segtrain import cli
for argv in (["segtrain", "--help"], ["segtrain", "fit"], ["segtrain"]):
    sys.argv = argv
    try:
        cli.run()  # the console script's entry point
    except SystemExit:
        pass
print("loaded:", sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("segtrain.commands.")))
sys.argv = ["segtrain", "list", "--help"]
try:
    cli.run()
except SystemExit:
    pass
print("after list:", sorted(m for m in sys.modules if m.startswith("segtrain.commands.") and m != "segtrain.commands"))
"""


def test_usage_and_an_unknown_command_load_no_command_and_no_tensorflow():
    """`segtrain --help` and a mistyped command answer at once: no command module is imported,
    and with it no TensorFlow (seconds of start-up). A command's help loads that command alone."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # a user's plain shell
    out = subprocess.run([sys.executable, "-c", _LIGHT_PATHS_PROBE], capture_output=True, text=True, timeout=120,
                         check=True, cwd=REPO, env=env).stdout
    assert "loaded: []" in out, out
    assert "after list: ['segtrain.commands.listing']" in out, out


def test_gin_file_with_a_failing_import(tmp_path):
    conf = tmp_path / "bad.gin"
    conf.write_text("import no_such_package_xyz\ntrain.model = 'unet'\n")
    _fails(segtrain_main("train", f"--gin_file={conf}", f"--model_dir={tmp_path / 'run'}"),
           "an `import` in a gin file failed", "no_such_package_xyz")


@pytest.mark.parametrize("command, flag, owners", [
    ("train", "--split=val", "`segtrain evaluate`"),
    ("evaluate", "--xla", "`segtrain train` and `segtrain doctor`"),
    ("evaluate", "--noxla", "`segtrain train` and `segtrain doctor`"),
    ("train", "--dataset=voc2012", "`segtrain prepare`"),
    ("list", "--model_dir=x", "`segtrain train` and `segtrain doctor` and `segtrain tune` and `segtrain evaluate` and `segtrain predict` "
                              "and `segtrain export` and `segtrain explain`"),
    ("export", "--scales=1", "`segtrain evaluate` and `segtrain predict`"),
    ("train", "--input=x.png", "`segtrain predict` and `segtrain explain`"),
])
def test_a_flag_of_another_command_is_an_error_naming_its_commands(command, flag, owners):
    result = segtrain_main(command, flag)
    assert result.returncode == 2
    name = flag.split("=")[0]
    assert result.stderr.strip() == (f"error: {name} is not a flag of `segtrain {command}`; it belongs to {owners}. "
                                     f"`segtrain {command} --help` lists the flags of {command}.")


def test_unknown_flag_suggests_the_closest_and_bad_values_are_named():
    result = segtrain_main("evaluate", "--modl_dir=x")
    assert result.returncode == 2 and "unknown flag --modl_dir for `segtrain evaluate`. Did you mean --model_dir?" \
        in result.stderr
    result = segtrain_main("evaluate", "--batch_size=0")
    assert result.returncode == 2 and "--batch_size=0" in result.stderr
    result = segtrain_main("train", "runs/x")
    assert result.returncode == 2 and "unexpected argument(s): runs/x" in result.stderr


@pytest.mark.parametrize("command, flags", [
    ("train", {"gin_file", "gin_param", "model_dir", "strategy", "cpu_replicas", "precision", "xla", "profile_steps",
               "verbosity"}),
    ("evaluate", {"gin_file", "gin_param", "model_dir", "split", "checkpoint", "batch_size", "verbosity", "mode",
                  "crop_size", "stride", "scales", "flip", "postprocess", "cpu_replicas", "export", "failures", "worst",
                  "calibrate"}),
    ("predict", {"gin_file", "gin_param", "model_dir", "checkpoint", "input", "output", "probabilities", "strict",
                 "batch_size", "verbosity", "mode", "crop_size", "stride", "scales", "flip", "postprocess", "export",
                 "calibrated"}),
    ("export", {"gin_file", "gin_param", "model_dir", "checkpoint", "output", "probabilities", "overwrite",
                "verbosity", "format", "quantize", "image_size", "calibration_images", "opset", "evaluate_split",
                "calibrated"}),
    ("explain", {"gin_file", "gin_param", "model_dir", "checkpoint", "input", "output", "class", "layer", "box",
                 "activations", "verbosity"}),
    ("prepare", {"gin_file", "gin_param", "dataset", "source_dir", "data_dir", "num_workers", "splits",
                 "skip_bad_examples", "overwrite", "verify", "verbosity"}),
    ("list", {"models", "backbones", "details"}),
    ("tune", {"gin_file", "gin_param", "model_dir", "space", "num_trials", "parallel", "pruner", "seed"}),
])
def test_help_of_a_command_shows_its_flags_and_only_those(command, flags):
    import re

    result = segtrain_main(command, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: segtrain {command} [flags]")
    assert set(re.findall(r"^  --(?:\[no\])?(\w+)", result.stdout, re.M)) == flags


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


_ALLOCATOR_PROBE = """
import segtrain.cli  # sets TensorFlow's environment defaults, as the segtrain command does
import tensorflow as tf
x = tf.ones([256, 256])
float(tf.reduce_sum(x @ x))
try:
    print("stats", tf.config.experimental.get_memory_info("CPU:0")["peak"] > 0)
except ValueError:  # only the BFC allocator keeps statistics
    print("no stats")
"""


@pytest.mark.parametrize("user_value, uses_bfc", [(None, True), ("false", False)])
def test_the_command_runs_tensorflow_with_the_bfc_cpu_allocator_unless_the_user_chose(user_value, uses_bfc):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    # With oneDNN on (TensorFlow's default on CPUs with AVX-512), TensorFlow allocates through
    # oneDNN's own caching allocator, which keeps statistics whatever the variable says: off,
    # the choice is between the plain allocator and BFC, which only BFC tells apart.
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    if user_value is not None:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = user_value
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert ("stats True" if uses_bfc else "no stats") in out, out


def test_each_process_keeps_its_temporary_files_in_a_directory_removed_at_exit(tmp_path):
    """Autograph's generated files live in the process's own temporary directory; what a killed
    segtrain process left is removed by the next one started on the machine."""
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    orphan, alive = tmp_path / f"segtrain-tmp-{gone}-abc", tmp_path / f"segtrain-tmp-{os.getpid()}-def"
    for directory in (orphan, alive):
        directory.mkdir()
        (directory / "__autograph_generated_filex1y2.py").write_text("# left by a killed process\n")
    (tmp_path / "other").mkdir()
    result = segtrain_cli("--help", env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "other"])


@pytest.mark.slow
def test_a_training_run_prints_segtrain_s_lines_only(tmp_path):
    """No TensorFlow start-up lines (absl's InitializeLog warning, oneDNN and cudart INFO, cuInit
    and oneDNN E lines): the user's environment sets no TF_CPP_MIN_LOG_LEVEL."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", "segtrain.cli", "train", f"--model_dir={tmp_path}",
                             *_params("train.num_steps = 2", "train.eval_every = 0")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    noise = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert noise == [], noise
    loud = subprocess.run([sys.executable, "-m", "segtrain.cli", "train", f"--model_dir={tmp_path}", "--verbosity=0",
                           *_params("train.num_steps = 2", "train.eval_every = 0")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "I0000" in loud.stderr  # TensorFlow's own lines, asked for
