"""A worker of a real 2-process cluster on 127.0.0.1 dies mid-run (kill -9): what the others do.

The job is relaunched after worker 1 is killed, and that relaunch loses its chief (worker 0,
which also hosts the coordination service), so one test covers both: the survivor's message,
the launcher's report, that no process is left behind, and that every worker of the relaunch
resumes from the checkpoint the message names.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, segtrain_cli, tiny_flags, wait_for_line

LOCAL = os.path.join(REPO, "launch", "local.py")
# Windows of 2 steps and a checkpoint every 4, so a kill lands mid-training after a checkpoint;
# the run is long enough never to finish first, and evaluates only at its end (never reached).
FLAGS = tiny_flags("train.num_steps = 200", "train.steps_per_loop = 2", "train.checkpoint_every = 4",
                   "train.eval_every = 0")


class Job:
    """launch/local.py with two workers, its output collected line by line; always reaped."""

    def __init__(self, model_dir, tmp_path):
        scratch = tmp_path / "scratch"
        scratch.mkdir(exist_ok=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(scratch))
        self.proc = subprocess.Popen([sys.executable, LOCAL, "--num_workers=2", "--timeout=400", "--", *FLAGS,
                                      f"--model_dir={model_dir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.times: list[float] = []
        self.pids: list[int] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self.times.append(time.monotonic())

    def seen_at(self, text: str) -> float:
        return next(t for t, line in zip(self.times, self.lines) if text in line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        return wait_for_line(self.lines, pattern, timeout, alive=lambda: self.proc.poll() is None)

    def worker(self, index: int) -> tuple[int, str]:
        """The pid and cluster address of worker ``index``."""
        match = self.wait_for(r"launch: started 2 workers \(pids (\d+), (\d+)\)")
        pid = int(match.group(index + 1))
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        return pid, json.loads(env[b"TF_CONFIG"])["cluster"]["worker"][index]

    def wait(self, timeout: float) -> int:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.proc.returncode

    def reap(self) -> None:
        if self.proc.poll() is None:
            for pid in self.pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
        self.proc.wait()


def kill_after_checkpoint(job: Job, model_dir, index: int, after_step: int) -> tuple[str, float]:
    """SIGKILLs worker ``index`` once the chief saved a checkpoint after ``after_step``; returns
    the worker's address and the time of the kill."""
    pid, address = job.worker(index)
    job.pids = [job.worker(0)[0], job.worker(1)[0]]
    from segtrain.train.checkpoints import latest_complete

    def saved() -> int:
        # Complete, and named by the state file: an ``.index`` alone can be a save in progress,
        # and a kill then leaves the survivor naming the checkpoint before it.
        path = latest_complete(str(model_dir))
        return int(re.search(r"ckpt-(\d+)$", path).group(1)) if path else -1

    end = time.monotonic() + 300
    while saved() <= after_step:
        assert job.proc.poll() is None and time.monotonic() < end, job.output[-3000:]
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return address, time.monotonic()


def left_behind(text: str) -> list[str]:
    """Command lines of running processes that mention ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(cmdline)
    return found


def assert_survivor_reported(job: Job, survivor: int, lost: int, address: str, killed_at: float,
                             model_dir) -> int:
    """The launcher and the survivor each said what happened, in time; returns the checkpoint step."""
    status = job.wait(timeout=120)
    took = time.monotonic() - killed_at
    out = job.output
    assert status == 137, out[-3000:]
    assert f"launch: worker {lost} was killed by signal 9 (SIGKILL)" in out
    # The survivor noticed by itself, within the launcher's grace (it was not SIGKILLed).
    assert f"launch: worker {survivor} exited with status 1." in out, out[-3000:]
    chief = ", the chief (it hosts the coordination service)" if lost == 0 else ""
    match = re.search(rf"^\[worker {survivor}\] error: lost worker {lost} \({re.escape(address)}\)"
                      rf"{re.escape(chief)} at about step \d+: .* Relaunch the job: every worker resumes from the chief's last "
                      rf"checkpoint ckpt-(\d+)\.$", out, re.M)
    assert match, out[-3000:]
    assert "Traceback" not in out
    assert took < 90, took  # does not hang (a generous bound: heartbeats time out after 20 s)
    noticed = job.seen_at(f"[worker {survivor}] error: lost worker {lost}") - killed_at
    print(f"worker {lost} killed: worker {survivor} said so {noticed:.1f} s later, the launcher exited "
          f"{took:.1f} s later")
    assert left_behind(str(model_dir)) == []
    return int(match.group(1))


@pytest.mark.slow
def test_a_killed_worker_stops_the_job_with_one_message_and_the_relaunch_resumes(tmp_path):
    from segtrain.train.checkpoints import latest_complete

    model_dir = tmp_path / "run"
    job = Job(model_dir, tmp_path)
    try:
        address, killed_at = kill_after_checkpoint(job, model_dir, 1, after_step=0)
        step = assert_survivor_reported(job, 0, 1, address, killed_at, model_dir)
    finally:
        job.reap()
    assert os.path.basename(latest_complete(str(model_dir))) == f"ckpt-{step}"

    # The relaunch resumes on every worker from that checkpoint; then it loses its chief.
    job = Job(model_dir, tmp_path)
    try:
        for i in (0, 1):
            resuming = f"Resuming {model_dir} from ckpt-{step} at step {step}"
            job.wait_for(rf"^\[worker {i}\] {re.escape(resuming)}$")
        address, killed_at = kill_after_checkpoint(job, model_dir, 0, after_step=step)
        last = assert_survivor_reported(job, 1, 0, address, killed_at, model_dir)
    finally:
        job.reap()
    assert last > step and os.path.basename(latest_complete(str(model_dir))) == f"ckpt-{last}"
    # Worker 1 of the relaunch removed the scratch directory the killed one left, and its own
    # temporary directory (autograph's generated files) although it ended hard (os._exit). What
    # the worker killed last left is removed by the next segtrain process to start here.
    scratch = tmp_path / "scratch"
    left = {p.name for p in scratch.iterdir()}
    assert not [n for n in left if n.startswith("__autograph_generated_file")], left
    assert len([n for n in left if n.startswith("segtrain-tmp-")]) == 1, left  # worker 0's, killed
    assert segtrain_cli("--help", env={"TMPDIR": str(scratch)}).returncode == 0
    assert list(scratch.iterdir()) == []
