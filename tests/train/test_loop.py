"""The loop alone: windows land on every action's steps, actions run in order, one may stop the run."""

from __future__ import annotations

import numpy as np
import pytest

from segtrain.train import loop
from segtrain.train.loop import Action, Window


def _window_fn(calls):
    def train_window(step, n):
        calls.append((step, n))
        return Window(step + n, n, np.zeros(n, np.float32), {"loss": 0.0}, 1.0)

    return train_window


class Recorder(Action):
    def __init__(self, log, name, every=None, stop_at=None):
        self.log, self.name, self.every, self.stop_at = log, name, every, stop_at

    def start(self, step):
        self.log.append((self.name, "start", step))

    def __call__(self, window):
        self.log.append((self.name, window.step, window.last))
        return window.step == self.stop_at

    def rewind(self, step):
        self.log.append((self.name, "rewind", step))

    def end(self, step):
        self.log.append((self.name, "end", step))

    def close(self):
        self.log.append((self.name, "close"))


def test_windows_end_at_every_action_interval_and_the_last_step():
    calls, log = [], []
    end = loop.run(_window_fn(calls), [Recorder(log, "a", every=4), Recorder(log, "b", every=6)], start=2,
                   num_steps=13, steps_per_loop=5)
    assert end == 13
    assert calls == [(2, 2), (4, 2), (6, 2), (8, 4), (12, 1)]
    assert [entry for entry in log if entry[0] == "a"] == [
        ("a", "start", 2), ("a", 4, False), ("a", 6, False), ("a", 8, False), ("a", 12, False), ("a", 13, True),
        ("a", "end", 13), ("a", "close")]


def test_an_action_stops_the_run_after_every_action_saw_the_window():
    calls, log = [], []
    end = loop.run(_window_fn(calls), [Recorder(log, "stopper", stop_at=6), Recorder(log, "after")], start=0,
                   num_steps=100, steps_per_loop=3)
    assert end == 6 and calls == [(0, 3), (3, 3)]
    assert ("after", 6, False) in log and ("after", "end", 6) in log


def test_an_error_skips_end_but_closes_every_action():
    log = []

    def failing(step, n):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        loop.run(failing, [Recorder(log, "a"), Recorder(log, "b")], start=0, num_steps=10, steps_per_loop=5)
    assert log == [("a", "start", 0), ("b", "start", 0), ("a", "close"), ("b", "close")]


def test_due_at_multiples_and_at_the_last_window():
    window = Window(10, 5, np.zeros(5), {}, 1.0)
    assert loop.due(window, 5) and loop.due(window, 10) and not loop.due(window, 4) and not loop.due(window, None)
    window.last = True
    assert loop.due(window, 4) and loop.due(window, None)


def test_a_rewind_goes_back_skips_the_later_actions_and_tells_every_action():
    calls, log = [], []

    class RewindOnce(Recorder):
        def __call__(self, window):
            super().__call__(window)
            if window.step == 6 and not any(entry == (self.name, "rewind", 2) for entry in log):
                raise loop.Rewind(2)

    end = loop.run(_window_fn(calls), [RewindOnce(log, "a"), Recorder(log, "b")], start=0, num_steps=8,
                   steps_per_loop=2)
    assert end == 8
    assert calls == [(0, 2), (2, 2), (4, 2), (2, 2), (4, 2), (6, 2)]
    assert ("a", "rewind", 2) in log and ("b", "rewind", 2) in log
    assert [e for e in log if e[0] == "b" and isinstance(e[1], int)] == [("b", 2, False), ("b", 4, False),
                                                                          ("b", 4, False), ("b", 6, False),
                                                                          ("b", 8, True)]
