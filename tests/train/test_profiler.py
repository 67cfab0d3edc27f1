"""--profile_steps: a trace of exactly the steps asked for, and no profiler left running on any way out."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from segtrain.errors import Interrupted, SegtrainError
from segtrain.experiment import ExperimentConfig
from segtrain.train import loop
from segtrain.train.loop import Window
from segtrain.train.profiler import Profiler
from tests.conftest import assert_user_error, segtrain_main, tiny_flags


def _traces(model_dir) -> list[str]:
    return glob.glob(os.path.join(str(model_dir), "train", "plugins", "profile", "*", "*.xplane.pb"))


def _step_markers(path: str) -> list[int]:
    """The step numbers of the "train" step markers in a trace (what the Profile tab calls steps)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    steps = []
    for plane in space.planes:
        stats = {k: v.name for k, v in plane.stat_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                if plane.event_metadata[event.metadata_id].name == "train":
                    steps += [s.int64_value for s in event.stats if stats[s.metadata_id] == "step_num"]
    return sorted(steps)


def assert_profiler_stopped(tmp_path):
    """A profiler left running would make this start raise AlreadyExistsError."""
    tf.profiler.experimental.start(str(tmp_path / "probe"))
    tf.profiler.experimental.stop()


def _fake_window(calls, fail_at=None, error=None):
    """A train_window without a model (a little TF work, so the trace has events); the window
    holding step ``fail_at`` raises ``error``."""

    def train_window(step, n):
        calls.append((step, n))
        tf.reduce_sum(tf.matmul(tf.ones([8, 8]), tf.ones([8, 8]))).numpy()
        if fail_at is not None and step < fail_at <= step + n:
            raise error
        return Window(step + n, n, np.zeros(n, np.float32), {"loss": 0.0}, 1.0)

    return train_window


def test_windows_end_around_the_steps_and_the_trace_holds_them(tmp_path, capsys):
    calls = []
    profiler = Profiler((5, 7), str(tmp_path), num_steps=10)
    end = loop.run(_fake_window(calls), [profiler], start=0, num_steps=10, steps_per_loop=3)
    assert end == 10
    # Windows end after step 4 and after step 7: the traced windows hold steps 5..7 exactly.
    assert calls == [(0, 3), (3, 1), (4, 3), (7, 3)]
    [trace] = _traces(tmp_path)
    assert _step_markers(trace) == [7]  # the one window 5..7, numbered by its last step
    out = capsys.readouterr().out
    assert f"Profiling steps 5..7 into {tmp_path}/train/plugins/profile" in out
    assert f"Profiled steps 5..7 to {os.path.dirname(trace)}" in out
    assert f"tensorboard --logdir {tmp_path}" in out and "segtrain[profile]" in out
    assert_profiler_stopped(tmp_path)


def test_a_range_longer_than_a_window_marks_every_window_and_stops_at_num_steps(tmp_path):
    calls = []
    profiler = Profiler((1, 50), str(tmp_path), num_steps=5)
    with pytest.warns(UserWarning, match=r"step 50 is past train.num_steps=5: profiling steps 1..5"):
        loop.run(_fake_window(calls), [profiler], start=0, num_steps=5, steps_per_loop=2)
    assert calls == [(0, 2), (2, 2), (4, 1)]
    [trace] = _traces(tmp_path)
    assert _step_markers(trace) == [2, 4, 5]
    assert_profiler_stopped(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError("the window failed"), KeyboardInterrupt()])
def test_a_run_that_fails_while_profiling_stops_the_profiler_and_keeps_the_trace(tmp_path, capsys, error):
    profiler = Profiler((2, 8), str(tmp_path), num_steps=10)
    with pytest.raises(type(error)):
        loop.run(_fake_window([], fail_at=6, error=error), [profiler], start=0, num_steps=10,
                 steps_per_loop=2)
    assert "The run ended while profiling steps 2..8: wrote what was traced" in capsys.readouterr().out
    assert len(_traces(tmp_path)) == 1
    assert_profiler_stopped(tmp_path)


class StopAt4(loop.Action):
    """An early stop at step 4 or later, or (``error``) preemption's way out at that window's end."""

    def __init__(self, error=None):
        self.error = error

    def __call__(self, window):
        if window.step >= 4 and self.error is not None:
            raise self.error
        return window.step >= 4


@pytest.mark.parametrize("error", [None, Interrupted("Stopped by SIGTERM at step 5", 15)])
def test_an_early_stop_or_preemption_inside_the_range_stops_the_profiler(tmp_path, error):
    profiler = Profiler((2, 8), str(tmp_path), num_steps=10)
    run = lambda: loop.run(_fake_window([]), [profiler, StopAt4(error)], start=0,  # noqa: E731
                           num_steps=10, steps_per_loop=2)
    if error is None:
        assert run() == 5  # windows 1, 2..3, 4..5
    else:
        with pytest.raises(Interrupted):
            run()
    assert len(_traces(tmp_path)) == 1
    assert_profiler_stopped(tmp_path)


def test_a_resumed_run_past_the_range_traces_nothing_and_says_so_once(tmp_path, capsys):
    calls = []
    profiler = Profiler((2, 3), str(tmp_path), num_steps=10)
    loop.run(_fake_window(calls), [profiler], start=6, num_steps=10, steps_per_loop=2)
    assert calls == [(6, 2), (8, 2)]  # windows as without profiling
    out = capsys.readouterr().out
    assert out.count("this run starts at step 6, past step 3: nothing to profile") == 1
    assert not _traces(tmp_path)


def test_a_resumed_run_inside_the_range_traces_from_where_it_starts(tmp_path, capsys):
    profiler = Profiler((2, 6), str(tmp_path), num_steps=10)
    loop.run(_fake_window([]), [profiler], start=4, num_steps=10, steps_per_loop=5)
    assert "Profiled steps 5..6" in capsys.readouterr().out
    assert _step_markers(_traces(tmp_path)[0]) == [6]


def test_only_the_chief_traces_but_every_worker_ends_its_windows_alike(tmp_path):
    chief_calls, worker_calls = [], []
    for chief, calls in ((True, chief_calls), (False, worker_calls)):
        profiler = Profiler((3, 4), str(tmp_path / str(chief)), num_steps=8, chief=chief)
        loop.run(_fake_window(calls), [profiler], start=0, num_steps=8, steps_per_loop=4)
    assert worker_calls == chief_calls == [(0, 2), (2, 2), (4, 4)]
    assert len(_traces(tmp_path / "True")) == 1 and not os.path.exists(tmp_path / "False")


def test_another_running_profiler_is_a_warning_not_a_failure(tmp_path):
    tf.profiler.experimental.start(str(tmp_path / "other"))
    try:
        profiler = Profiler((1, 2), str(tmp_path), num_steps=4)
        with pytest.warns(UserWarning, match="another TensorFlow profiler is already running"):
            end = loop.run(_fake_window([]), [profiler], start=0, num_steps=4, steps_per_loop=2)
        assert end == 4 and not _traces(tmp_path)
    finally:
        tf.profiler.experimental.stop()


@pytest.mark.parametrize("value", [(0, 3), (5, 3), (4,), (1, 2, 3), (1.0, 2), (True, 2), "1,2", ("1", "2")])
def test_bad_profile_steps_are_one_error_naming_flag_binding_and_value(value):
    with pytest.raises(SegtrainError) as e:
        ExperimentConfig(profile_steps=value)
    assert "--profile_steps (train.profile_steps)" in str(e.value) and repr(value) in str(e.value)
    assert "1 <= A <= B" in str(e.value)


def test_a_bad_flag_value_is_one_error(tmp_path):
    result = segtrain_main("train", *tiny_flags(), f"--model_dir={tmp_path}", "--profile_steps=5,3")
    assert_user_error(result, "--profile_steps (train.profile_steps)", "got (5, 3)")
    result = segtrain_main("train", *tiny_flags(), f"--model_dir={tmp_path}", "--profile_steps=5,x")
    assert_user_error(result, "--profile_steps (train.profile_steps)", "got (5, 'x')")
