"""`segtrain tune`: the search space, the device shares, pruning, failed and stopped trials, and a
real study on `shapes` that is killed and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import gin
import pytest

from segtrain.errors import SegtrainError
from segtrain.tune import space as search_space
from tests.conftest import REPO, TINY, tiny_flags, wait_for_line

optuna = pytest.importorskip("optuna")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_and_gin_spaces_read_alike(tmp_path):
    yaml_path = write(tmp_path, "s.yaml", (
        "learning_rate.base: loguniform(1e-4, 1e-2)  # a comment\n"
        "learning_rate.warmup_steps: int(0, 100, step=25)\n"
        "pipeline.max_scale: uniform(1.0, 1.5)\n"
        "train.loss: choice('cross_entropy', 'dice')\n"
        "pipeline.crop_size: choice((48, 48), (64, 64))\n"
        "models.unet.depth: logint(2, 4)\n"
        "train.num_steps: 600\n"
        "optimizer.name: adamw\n"))
    gin_path = write(tmp_path, "s.gin", (
        "learning_rate.base = loguniform(1e-4, 1e-2)  # a comment\n"
        "learning_rate.warmup_steps = int(0, 100, step=25)\n"
        "pipeline.max_scale = uniform(1.0, 1.5)\n"
        "train.loss = choice('cross_entropy',\n"
        "                    'dice')\n"
        "pipeline.crop_size = choice((48, 48), (64, 64))\n"
        "models.unet.depth = logint(2, 4)\n"
        "train.num_steps = 600\n"
        "optimizer.name = 'adamw'\n"))
    a, b = search_space.read(yaml_path), search_space.read(gin_path)
    strip = lambda space: [(d.name, d.kind, d.low, d.high, d.step, d.choices) for d in space.dimensions]  # noqa: E731
    assert strip(a) == strip(b)
    assert [d.kind for d in a.dimensions] == ["loguniform", "int", "uniform", "choice", "choice", "logint"]
    assert a.fixed == b.fixed == ("train.num_steps = 600", "optimizer.name = 'adamw'")
    loss = a.dimensions[3]
    assert loss.choices == ("'cross_entropy'", "'dice'") and b.dimensions[3].choices == loss.choices
    params = {"learning_rate.base": 0.001, "learning_rate.warmup_steps": 25, "pipeline.max_scale": 1.25,
              "train.loss": "'dice'", "pipeline.crop_size": "(64, 64)", "models.unet.depth": 3}
    assert a.bindings(params)[2:] == ["learning_rate.base = 0.001", "learning_rate.warmup_steps = 25",
                                      "pipeline.max_scale = 1.25", "train.loss = 'dice'",
                                      "pipeline.crop_size = (64, 64)", "models.unet.depth = 3"]
    dists = a.distributions()
    assert dists["learning_rate.base"].log and dists["learning_rate.warmup_steps"].step == 25
    assert isinstance(dists["train.loss"], optuna.distributions.CategoricalDistribution)
    # Every end of every dimension is reached by the corners checked before the study starts.
    corners = a.corners()
    assert any("train.loss = 'cross_entropy'" in c for c in corners) and any("train.loss = 'dice'" in c
                                                                             for c in corners)
    assert any("learning_rate.base = 0.0001" in c for c in corners) and any("learning_rate.base = 0.01" in c
                                                                            for c in corners)


@pytest.mark.parametrize("line, fragments", [
    ("learning_rate.base: loguniform(0, 1)", ["line 1", "log scale needs low > 0"]),
    ("learning_rate.base: uniform(2, 1)", ["low must be below high"]),
    ("train.loss: choice('dice')", ["two values or more"]),
    ("models.unet.depth: int(2, 4.5)", ["whole numbers"]),
    ("learning_rate.base: loguniform(1e-4, 1e-2, step=1)", ["takes no step"]),
    ("learning_rate.base: uniform(a, 1)", ["'a' is not a number"]),
    ("learning rate: uniform(0, 1)", ["not a gin binding name"]),
])
def test_bad_spaces_are_refused_by_file_and_line(tmp_path, line, fragments):
    path = write(tmp_path, "s.yaml", line + "\n")
    with pytest.raises(SegtrainError) as e:
        search_space.read(path)
    assert path in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_a_space_of_fixed_values_only_or_a_missing_file_is_refused(tmp_path):
    with pytest.raises(SegtrainError, match="only fixed values"):
        search_space.read(write(tmp_path, "s.gin", "train.num_steps = 10\n"))
    with pytest.raises(SegtrainError, match="no such file"):
        search_space.read(str(tmp_path / "missing.yaml"))


def test_device_shares(monkeypatch):
    from segtrain.tune import study

    monkeypatch.setattr(study, "visible_gpus", lambda: [])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    slots = study.device_slots(2)
    assert [s.cores for s in slots] == [(0, 1), (2, 3)]
    assert [s.describe for s in slots] == ["CPU cores 0-1", "CPU cores 2-3"]
    assert slots[0].env["TF_NUM_INTRAOP_THREADS"] == "2" and slots[0].env["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(SegtrainError, match="--parallel=5 .* 4 CPU core"):
        study.device_slots(5)
    monkeypatch.setattr(study, "visible_gpus", lambda: ["0", "1", "2", "3"])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in study.device_slots(2)] == ["0,2", "1,3"]
    shared = study.device_slots(8)
    assert shared[5].env == {"CUDA_VISIBLE_DEVICES": "1", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert shared[5].describe == "GPU 1 (shared)"
    monkeypatch.undo()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert study.visible_gpus() == ["2", "5"]


def _study(tmp_path, text="learning_rate.base: loguniform(1e-3, 1e-2)\n", pruner="median"):
    from segtrain.tune.study import Objective, Study

    space = search_space.read(write(tmp_path, "space.yaml", text))
    return Study(str(tmp_path / "study"), space, [], list(TINY), Objective("mean_iou", "max", "validation"),
                 pruner=pruner)


def test_a_trial_reports_and_is_pruned(tmp_path, capsys):
    import numpy as np

    from segtrain.train.loop import Window
    from segtrain.train.pruning import PRUNED_RECORD, ReportToStudy
    from segtrain.tune.study import storage_url

    study = _study(tmp_path)
    for value in (0.8, 0.7):  # two finished trials: the median pruner's start-up
        trial = study.study.ask(study.space.distributions())
        for step in (3, 6):
            trial.report(value, step)
        study.study.tell(trial, value)
    trial = study.study.ask(study.space.distributions())
    run = tmp_path / "run"
    run.mkdir()
    action = ReportToStudy({"storage": storage_url(study.parent), "study": "segtrain", "trial_id": trial._trial_id,
                            "number": trial.number, "metric": "mean_iou", "pruner": "median"}, str(run))
    action.start(0)

    def window(step, value, last=False):
        return Window(step, 3, np.zeros(3, np.float32), {}, 1.0, last=last, eval=({"mean_iou": value}, None))

    assert action(Window(2, 2, np.zeros(2, np.float32), {}, 1.0)) is False  # no evaluation: nothing to report
    assert action(window(3, 0.1)) is True
    assert "pruned at step 3" in capsys.readouterr().out
    assert (run / PRUNED_RECORD).exists()
    assert study.study.trials[2].intermediate_values == {3: 0.1}
    with pytest.raises(SegtrainError, match="one machine"):
        ReportToStudy({}, str(run), multi_worker=True)


def test_failed_and_stopped_trials(tmp_path, capsys):
    from optuna.trial import TrialState

    study = _study(tmp_path)
    trial = study.study.ask(study.space.distributions())
    run = tmp_path / "study" / "trial_0"
    run.mkdir(parents=True)
    (run / "train.log").write_text("training...\nerror: The loss became nan at step 4.\n")
    trial.set_user_attr("model_dir", str(run))
    study._finish(trial, 1, str(run))
    out = capsys.readouterr().out
    assert "trial 0 failed (exit status 1: error: The loss became nan at step 4.)" in out and "goes on" in out
    assert study.study.trials[0].state == TrialState.FAIL and study.finished() == 1
    # A trial left running by a killed tune is failed and queued again, in its own directory.
    left = study.study.ask(study.space.distributions())
    left.set_user_attr("model_dir", str(tmp_path / "study" / "trial_1"))
    assert study.requeue_interrupted() == [1]
    again = study.study.ask(study.space.distributions())
    assert again.user_attrs == {"model_dir": str(tmp_path / "study" / "trial_1"), "resumes": 1}
    assert again.params == left.params
    assert study.finished() == 1  # the stopped trial does not count: its rerun will
    assert "stopped" in study.table()


def test_a_resumed_study_must_keep_its_settings(tmp_path):
    _study(tmp_path)
    with pytest.raises(SegtrainError, match="started with another space than"):
        _study(tmp_path, "learning_rate.base: loguniform(1e-4, 1e-2)\n")


def test_misspelt_bindings_fail_before_any_trial(tmp_path):
    from segtrain.commands import tune

    space = search_space.read(write(tmp_path, "s.yaml", "models.unet.dept: int(2, 3)\n"))
    with pytest.raises(SegtrainError) as e:
        tune.check(space, [], TINY)
    assert "would not train" in str(e.value) and "models.unet.dept = 2" in str(e.value)
    assert "depth" in str(e.value)  # gin's suggestion survives
    space = search_space.read(write(tmp_path, "s2.yaml", "train.loss: choice('dice', 'dicey')\n"))
    with pytest.raises(SegtrainError, match="dicey"):
        tune.check(space, [], TINY)
    space = search_space.read(write(tmp_path, "s3.yaml", "learning_rate.base: loguniform(1e-3, 1e-2)\n"))
    objective = tune.check(space, [], TINY)
    assert (objective.metric, objective.direction, objective.split) == ("mean_iou", "maximize", "validation")
    assert not gin.config._CONFIG  # the check leaves no configuration behind


@pytest.mark.slow
def test_a_killed_study_resumes_and_ends_with_the_best_config(tmp_path):
    """A real study: killed (SIGKILL) in its first trial, which saves a checkpoint as it dies;
    the next `tune` resumes that trial from it, runs the rest two at a time, and writes best.gin."""
    space = write(tmp_path, "space.yaml", "learning_rate.base: loguniform(1e-3, 1e-2)\n"
                                          "models.unet.base_filters: choice(4, 8)\n")
    parent = tmp_path / "study"
    args = [sys.executable, "-m", "segtrain.cli", "tune", f"--space={space}", f"--model_dir={parent}",
            "--num_trials=2", *tiny_flags("train.num_steps = 9", "train.steps_per_loop = 1")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True).start()
    try:
        wait_for_line(lines, r"trial 0 started on CPU", 120, alive=lambda: first.poll() is None)
        wait_for_file(parent / "trial_0" / "ckpt-3.index", 180)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    # The trial got SIGTERM when tune died, and saved a checkpoint as a preempted job does.
    wait_for_line_in_file(parent / "trial_0" / "train.log", r"SIGTERM", 120)
    second = subprocess.run([*args, "--parallel=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "Trial(s) 0 stopped with the last tune" in out
    assert "trial 1 started on CPU core" in out and "resuming trial 0" in out
    assert "Resuming" in (parent / "trial_0" / "train.log").read_text()
    study = optuna.load_study(study_name="segtrain", storage=f"sqlite:///{parent}/study.db")
    states = [t.state.name for t in study.trials]
    assert states[0] == "FAIL" and states.count("FAIL") == 1 and len(states) == 3, states
    for t in study.trials[1:]:
        assert os.path.exists(os.path.join(t.user_attrs["model_dir"], "operative_config.gin"))
        assert [f for f in os.listdir(t.user_attrs["model_dir"]) if f.endswith(".hparams")]
    best = parent / "best.gin"
    assert best.exists() and "The best trial: " in out and "Train it: segtrain train --gin_file=" in out
    gin.clear_config()
    from segtrain.commands.configure import parse_config

    parse_config([str(best)])
    assert gin.query_parameter("models.unet.base_filters") == int(study.best_params["models.unet.base_filters"])
    gin.clear_config()


def wait_for_file(path, timeout: float) -> None:
    import time

    end = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < end, f"no {path} within {timeout} s"
        time.sleep(0.1)


def wait_for_line_in_file(path, pattern: str, timeout: float) -> None:
    import re
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path) and re.search(pattern, open(path, errors="replace").read()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{path}: no {pattern!r} within {timeout} s:\n"
                         + (open(path).read()[-3000:] if os.path.exists(path) else "(no file)"))
