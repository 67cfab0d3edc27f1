"""Shared fixtures: a clean gin config per test, and a tiny experiment that trains in seconds."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import gin
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import segtrain.cli  # noqa: E402,F401  TensorFlow's environment as the segtrain command sets it (CPU allocator)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A U-Net small enough to train a few steps in seconds on two CPU cores.
TINY = [
    "train.model = 'unet'",
    "models.unet.depth = 2",
    "models.unet.base_filters = 4",
    "train.batch_size = 4",
    "train.num_steps = 6",
    "train.eval_every = 3",
    "train.steps_per_loop = 3",
    "train.num_image_panels = 2",
    "pipeline.crop_size = (32, 32)",
    "datasets.shapes.min_size = 32",
    "datasets.shapes.max_size = 40",
    "datasets.shapes.num_train = 64",
    "datasets.shapes.num_validation = 8",
    "datasets.shapes.num_test = 8",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny run trained once per session (TINY: 6 steps, evaluations at 3 and 6). Read it, or
    copy it with ``copy_run`` before changing it."""
    from segtrain.commands.configure import parse_config
    from segtrain.train.trainer import train

    path = tmp_path_factory.mktemp("trained") / "run"
    gin.clear_config()
    parse_config([], TINY)
    train(str(path))
    gin.clear_config()
    return path


def copy_run(run, destination) -> str:
    """A private copy of a trained run directory; returns its path."""
    import shutil

    shutil.copytree(run, destination)
    return str(destination)


@pytest.fixture(autouse=True)
def clean_gin():
    """Every test starts with an empty gin config and Keras' float32 policy: an Experiment sets
    the policy of its run's precision, and a model built without one would inherit it."""
    import keras

    gin.clear_config()
    keras.mixed_precision.set_global_policy("float32")
    yield
    gin.clear_config()


@pytest.fixture
def configure():
    """configure(*bindings): a fresh gin config of TINY plus the given bindings (later ones win)."""
    from segtrain.commands.configure import parse_config

    def apply(*bindings: str, tiny: bool = True):
        gin.clear_config()
        parse_config([], (TINY if tiny else []) + list(bindings))

    return apply


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar summary under ``logdir``."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        ea = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
        ea.Reload()
        for tag in ea.Tags()["tensors"]:
            for event in ea.Tensors(tag):
                value = tf.make_ndarray(event.tensor_proto)
                if value.ndim == 0 and value.dtype.kind == "f":
                    out.setdefault(tag, []).append((event.step, float(value)))
    return out


def read_tags(logdir: str) -> set[str]:
    from tensorboard.backend.event_processing import event_accumulator

    tags: set[str] = set()
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        ea = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
        ea.Reload()
        tags |= set(ea.Tags()["tensors"])
    return tags


def segtrain_cli(*args: str, cwd: str = REPO, env: dict | None = None, timeout: int = 300):
    """Runs the `segtrain` command in a fresh process; returns the CompletedProcess."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "segtrain.cli", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def segtrain_main(*args: str):
    """Runs `segtrain` in this process (no TensorFlow start-up to pay); returns what
    ``segtrain_cli`` returns: returncode, stdout and stderr."""
    import contextlib
    import io
    import types

    from segtrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["segtrain", *args])
    finally:
        gin.clear_config()
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def tiny_flags(*extra: str) -> list[str]:
    """TINY plus ``extra`` bindings as --gin_param flags of the `segtrain` command."""
    return [f"--gin_param={b}" for b in TINY + list(extra)]


def assert_user_error(result, *fragments: str) -> str:
    """A finished `segtrain` process failed with one `error:` line holding every fragment."""
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in error, error
    assert "Traceback" not in result.stderr
    return error


def wait_for_line(lines: list, pattern: str, timeout: float, alive=None) -> "re.Match":
    """The first of ``lines`` (a list another thread appends a process's output to) that
    matches ``pattern``, waiting up to ``timeout`` s; ``alive()`` False ends the wait early."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in list(lines):
            match = re.search(pattern, line)
            if match:
                return match
        if alive is not None and not alive():
            break
        time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n" + "".join(lines[-40:]))


def event_steps(logdir: str) -> list[tuple[str, int]]:
    """(tag, step) of every summary value in the event files under ``logdir``, in file order;
    the tag of a summary other than a scalar says its kind: ``'config/operative_gin (text)'``."""
    import tensorflow as tf

    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                out.append((value.tag if plugin in ("", "scalars") else f"{value.tag} ({plugin})", event.step))
    return out

