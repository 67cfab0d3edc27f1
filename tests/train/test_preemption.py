"""Preemption: a signal saves a checkpoint at the next window end; a rerun resumes exactly there.

Real signals to a real `segtrain train`. The 2-worker case (one worker signalled, both save at
the same step, both resume) is part of tests/test_launch.py's two-worker test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from segtrain.errors import Interrupted
from segtrain.train.loop import Window
from segtrain.train.preemption import Preemption
from tests.conftest import REPO, segtrain_cli, tiny_flags, wait_for_line

LONG = ("train.num_steps = 100000", "train.steps_per_loop = 2", "train.eval_every = 0",
        "train.checkpoint_every = 100000", "train.num_image_panels = 0")


class FakeCheckpoints:
    model_dir = "/runs/x"

    def __init__(self):
        self.saved = []

    def save(self, step):
        self.saved.append(step)
        return f"/runs/x/ckpt-{step}"


def _window(step):
    return Window(step, 2, np.zeros(2, np.float32), {"loss": 0.0, "learning_rate": 0.1}, 10.0)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_at_the_window_end_and_stops(signum, code):
    import tensorflow as tf

    checkpoints = FakeCheckpoints()
    action = Preemption(checkpoints, tf.distribute.get_strategy(), grace=30)
    previous = signal.getsignal(signum)
    action.start(0)
    try:
        action(_window(2))
        assert checkpoints.saved == []
        os.kill(os.getpid(), signum)  # the handler runs before the next line
        with pytest.raises(Interrupted) as raised:
            action(_window(4))
    finally:
        action.close()
    assert signal.getsignal(signum) is previous
    assert checkpoints.saved == [4]
    name = signal.Signals(signum).name
    assert raised.value.exit_code == code and not raised.value.hard_exit
    assert str(raised.value).startswith(f"Stopped by {name} at step 4: saved /runs/x/ckpt-4")
    assert f"resume from step 4 (exit status {code})" in str(raised.value)


def test_a_cluster_worker_failing_outlives_the_launchers_sigterm_to_report(capfd):
    """A worker that lost a peer is between its error and its report when the launcher SIGTERMs
    the survivors: it must not die of that signal before it says which peer was lost."""
    import tensorflow as tf

    action = Preemption(FakeCheckpoints(), tf.distribute.get_strategy(), grace=30)
    action.names = ["worker 0", "worker 1"]  # as in a 2-worker cluster
    previous = signal.getsignal(signal.SIGTERM)
    action.start(0)
    try:
        with pytest.raises(RuntimeError):
            try:
                raise RuntimeError("a lost peer")
            finally:
                action.close()
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line: no death
        assert "Received SIGTERM while stopping on an error" in capfd.readouterr().err
        assert action.signum is None  # noted only: there is no window end to save at
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_failing_single_process_run_gives_the_handlers_back():
    import tensorflow as tf

    action = Preemption(FakeCheckpoints(), tf.distribute.get_strategy(), grace=30)
    previous = signal.getsignal(signal.SIGTERM)
    action.start(0)
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("an error")
        finally:
            action.close()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_ctrl_c_twice_stops_at_once():
    import tensorflow as tf

    action = Preemption(FakeCheckpoints(), tf.distribute.get_strategy(), grace=30)
    action.start(0)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line
    finally:
        action.close()


class Lines:
    """Collects a process's output lines in a thread; ``wait_for`` a pattern."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, pipe):
        for line in iter(pipe.readline, ""):
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        return wait_for_line(self.lines, pattern, timeout)

    @property
    def text(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.lines)


def _start(args, env=None) -> tuple[subprocess.Popen, Lines]:
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
                                                 **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    return proc, Lines(proc)


def _reap(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_a_rerun_resumes_at_that_step(tmp_path):
    model_dir = tmp_path / "run"
    proc, out = _start([sys.executable, "-m", "segtrain.cli", "train", f"--model_dir={model_dir}", *tiny_flags(*LONG)])
    try:
        out.wait_for(r"^train step \d+", timeout=120)
        proc.send_signal(signal.SIGTERM)
        code = _reap(proc, timeout=60)
    finally:
        _reap(proc, timeout=0)
    text = out.text
    assert code == 143, text[-3000:]
    assert "Received SIGTERM: saving a checkpoint at the end of the current window" in text
    step = int(re.search(rf"Stopped by SIGTERM at step (\d+): saved {model_dir}/ckpt-\d+", text).group(1))
    assert 0 < step < 100000 and step % 2 == 0, text[-2000:]  # a window end
    assert (model_dir / f"ckpt-{step}.index").exists()

    resumed = segtrain_cli("train", f"--model_dir={model_dir}",
                           *tiny_flags(*LONG, f"train.num_steps = {step + 2}"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming {model_dir} from ckpt-{step} at step {step}" in resumed.stdout
    assert (model_dir / f"ckpt-{step + 2}.index").exists()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _worker_pid(launcher: int, index: int, timeout: float = 60) -> int:
    """The pid of worker ``index`` of a launch/local.py process (its TF_CONFIG says which)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for pid in _children(launcher):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            except OSError:
                continue
            if f'"index": {index}'.encode() in env.get(b"TF_CONFIG", b""):
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no worker {index} under launcher {launcher}")
