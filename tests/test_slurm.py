"""launch/slurm.sbatch against a real SLURM: launch/slurm/local_cluster.sh starts munged,
slurmctld and two slurmd (two node entries on this host) for this module and stops them after.

Skipped, with the reason, where Debian's slurm-wlm and munge are not installed or this is not
root. The layouts: one node; two nodes with a task each (SEGTRAIN_PORTS=job, as two node
entries of one host need); one node with two tasks (one task per GPU, on CPU here); and a job
that is cancelled mid-run, requeued, and resumes from its checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, tiny_flags

HARNESS = os.path.join(REPO, "launch", "slurm", "local_cluster.sh")
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "sbatch", "srun", "squeue", "scancel", "scontrol")
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _why_not() -> str | None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"SLURM is not installed (missing {', '.join(missing)}; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root"
    return None


def _free_port_run(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now."""
    import socket

    from segtrain.runtime.cluster import free_ports

    for _ in range(50):
        (first,) = free_ports(1)
        try:
            held = []
            for port in range(first, first + count):
                s = socket.socket()
                held.append(s)
                s.bind(("", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, PORT=str(_free_port_run(3)))
    env.pop("TF_CONFIG", None)
    try:
        started = subprocess.run(["bash", HARNESS, "start", str(directory)], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield dict(env, SLURM_CONF=str(directory / "slurm.conf"))
    finally:
        stopped = subprocess.run(["bash", HARNESS, "stop", str(directory)], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for name in ("slurmctld", "slurmd", "munged"):
        pid_files = list(directory.glob(f"{name}*.pid"))
        assert pid_files == [], pid_files  # every daemon it started was stopped


def submit(slurm, tmp_path, sbatch_args, *bindings, **env) -> tuple[str, str]:
    """Submits launch/slurm.sbatch with tiny training flags; returns the job id and its output file."""
    out = str(tmp_path / "job-%j.out")
    job_env = dict(slurm, PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2", CONNECT_TIMEOUT="120",
                   SEGTRAIN_PORT=str(_free_port_run(4)), **env)
    command = ["sbatch", "--parsable", "--gres=none", "--cpus-per-task=1", "--time=15", f"--output={out}",
               "--open-mode=append", os.path.join(REPO, "launch", "slurm.sbatch"),
               *tiny_flags("train.eval_every = 0", *bindings), f"--model_dir={tmp_path / 'run'}"]
    result = subprocess.run(command[:1] + sbatch_args + command[1:], env=job_env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    return job, out.replace("%j", job)


def job_state(slurm, job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm, capture_output=True, text=True,
                           timeout=30).stdout
    match = re.search(r"\bJobState=(\S+)", shown)
    return match.group(1) if match else "UNKNOWN"


def wait_until(slurm, job: str, states: tuple[str, ...], timeout: float, output: str) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = job_state(slurm, job)
        if state in states:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=slurm, timeout=30)
    pytest.fail(f"job {job} still {job_state(slurm, job)} after {timeout} s:\n{read(output)[-3000:]}")


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def finished(slurm, job, output, timeout=400) -> str:
    state = wait_until(slurm, job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout, output)
    text = read(output)
    assert state == "COMPLETED", text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return text


def fingerprints(text: str, step: int) -> dict:
    return dict(re.findall(rf"^(worker\d+|local): step {step}, weights sha256 (\w+) \([^)]*\)$", text, re.M))


def test_a_one_node_job_trains_without_a_cluster(slurm, tmp_path):
    job, output = submit(slurm, tmp_path, ["--nodes=1"])
    text = finished(slurm, job, output)
    assert "segtrain: 1 node(s)" in text and "1 task(s)" in text
    assert text.count("Done. TensorBoard") == 1
    assert fingerprints(text, 6) == {}  # no cluster: no workers to compare
    assert (tmp_path / "run" / "ckpt-6.index").exists()


def test_a_two_node_job_is_one_cluster_of_a_worker_per_node(slurm, tmp_path):
    job, output = submit(slurm, tmp_path, ["--nodes=2"], SEGTRAIN_PORTS="job")
    text = finished(slurm, job, output)
    assert "segtrain: 2 node(s)" in text and "2 task(s)" in text
    printed = fingerprints(text, 6)
    assert set(printed) == {"worker0", "worker1"} and len(set(printed.values())) == 1, printed  # they agree
    losses = re.findall(r"^train step 6/6  loss (\S+)", text, re.M)
    assert len(losses) == 2 and len(set(losses)) == 1, text[-3000:]  # one training, reported twice
    assert len(list((tmp_path / "run" / "train").glob("events.out.tfevents.*"))) == 1  # the chief's


def test_doctor_in_two_tasks_on_one_node_checks_the_job_as_it_will_run(slurm, tmp_path):
    # SEGTRAIN_COMMAND=doctor: the same script, flags and layout as the training job. The layout is
    # one task per GPU (--ntasks-per-node=G) with 'node' ports, P and P+1 on one node: the
    # doctor's cluster and replica checks connect the two tasks, so they listen on distinct ports
    # (two nodes are trained on in the tests above and below).
    job, output = submit(slurm, tmp_path, ["--nodes=1", "--ntasks-per-node=2"], SEGTRAIN_COMMAND="doctor")
    text = finished(slurm, job, output)
    assert "segtrain: 1 node(s)" in text and "2 task(s)" in text
    assert text.count("doctor: every check passed") == 2, text[-3000:]
    assert re.search(r"^cluster +ok +\w+: worker 0 \(chief\) of 2 tasks", text, re.M), text[-3000:]
    assert len(set(re.findall(r"^replicas agree +ok .*\(sha256 (\w+)\)$", text, re.M))) == 1
    assert not (tmp_path / "run").exists()


def test_a_cancelled_job_requeued_resumes_from_its_checkpoint(slurm, tmp_path):
    from segtrain.train.checkpoints import latest_complete

    model_dir = tmp_path / "run"
    job, output = submit(slurm, tmp_path, ["--nodes=2"], "train.num_steps = 60", "train.steps_per_loop = 2",
                         "train.checkpoint_every = 4", SEGTRAIN_PORTS="job")
    end = time.monotonic() + 300
    while latest_complete(str(model_dir)) is None:
        assert job_state(slurm, job) in ("PENDING", "RUNNING", "CONFIGURING"), read(output)[-3000:]
        assert time.monotonic() < end, read(output)[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=slurm, check=True, timeout=30)
    wait_until(slurm, job, ("CANCELLED",), 120, output)
    saved = int(re.search(r"ckpt-(\d+)$", latest_complete(str(model_dir))).group(1))
    assert 0 < saved < 60

    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True, timeout=30)
    # SLURM holds a requeued job back for a while; this test has no reason to wait.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True, timeout=30)
    text = finished(slurm, job, output)
    resumed = re.findall(rf"^Resuming {re.escape(str(model_dir))} from ckpt-(\d+) at step \1$", text, re.M)
    assert len(resumed) == 2 and len(set(resumed)) == 1 and int(resumed[0]) >= saved, text[-3000:]
    assert set(fingerprints(text, 60)) == {"worker0", "worker1"}
    assert os.path.basename(latest_complete(str(model_dir))) == "ckpt-60"
