"""The launchers: real 2-process multi-worker training on 127.0.0.1, SLURM and Kubernetes files."""

from __future__ import annotations

import pytest

import json
import os
import re
import signal
import subprocess
import sys
import time

import yaml

from segtrain.runtime.cluster import free_ports
from tests.conftest import REPO, assert_user_error, segtrain_cli, tiny_flags

LOCAL = os.path.join(REPO, "launch", "local.py")
sys.path.insert(0, os.path.join(REPO, "launch"))
import local  # noqa: E402  (launch/ is scripts, not a package)


def _env(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    # Workers' scratch directories go here, so the test can see that they are removed.
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(scratch))


@pytest.mark.slow
def test_two_workers_preempted_resume_to_identical_weights_and_only_the_chief_writes(tmp_path):
    from tests.train.test_preemption import LONG, _reap, _start, _worker_pid

    model_dir = tmp_path / "run"
    # The optional collective timeout and the cluster-size check take part too: neither may
    # disturb training, checkpoints or evaluation.
    # Batch norm as the models build it (each replica's own statistics, averaged at window ends).
    flags = tiny_flags("distribute.num_workers = 2", "distribute.collective_timeout = 120", *LONG)
    launch = [sys.executable, LOCAL, "--num_workers=2", "--timeout=400", "--", f"--model_dir={model_dir}"]
    env = _env(tmp_path)
    proc, out = _start([*launch, *flags], env)
    try:
        out.wait_for(r"^\[worker 0\] train step \d+", timeout=300)
        # Worker 1 alone is signalled: worker 0 learns it in the window-end all-reduce.
        os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)
        code = _reap(proc, timeout=120)
    finally:
        _reap(proc, timeout=0)
    text = out.text
    assert code == 143, text[-4000:]
    steps = set()
    for i in (0, 1):
        match = re.search(rf"^\[worker {i}\] Stopped after worker 1 received SIGTERM at step (\d+): saved "
                          rf"{model_dir}/ckpt-\1\b", text, re.M)
        assert match, text[-4000:]
        steps.add(int(match.group(1)))
    assert len(steps) == 1, steps  # the same step on both
    step = steps.pop()
    # The chief's files, once; the other worker's scratch directory is gone.
    assert (model_dir / f"ckpt-{step}.index").exists()
    assert len(list((model_dir / "train").glob("events.out.tfevents.*"))) == 1
    assert (model_dir / "operative_config.gin").exists()
    assert [p.name for p in (tmp_path / "scratch").iterdir() if p.name.startswith("segtrain-")] == []

    # The relaunch: every worker resumes from the chief's checkpoint, and they end equal.
    result = subprocess.run([*launch, *flags, f"--gin_param=train.num_steps = {step + 3}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    for i in (0, 1):
        assert f"[worker {i}] Resuming {model_dir} from ckpt-{step} at step {step}" in result.stdout
    fingerprints = dict(re.findall(rf"^\[worker \d\] (worker\d): step {step + 3}, weights sha256 (\w+) \(1 replica\)$",
                                   result.stdout, re.M))
    assert set(fingerprints) == {"worker0", "worker1"}, result.stdout[-3000:]
    assert fingerprints["worker0"] == fingerprints["worker1"]
    assert "launch: all 2 workers finished." in result.stdout
    assert (model_dir / f"ckpt-{step + 3}.index").exists() and (model_dir / "best" / "best.json").exists()
    assert len(list((model_dir / "train").glob("events.out.tfevents.*"))) == 2  # one per launch
    assert [p.name for p in (tmp_path / "scratch").iterdir() if p.name.startswith("segtrain-")] == []
    # Evaluation of the multi-worker run on one machine works from the chief's checkpoint.
    evaluated = segtrain_cli("evaluate", f"--model_dir={model_dir}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]


@pytest.mark.slow
def test_a_fresh_two_worker_run_agrees_and_saves_the_model_it_evaluated(tmp_path):
    """Default batch norm: each worker normalises with its own batch statistics, and the
    window-end average makes every worker end with the same state, which is what the chief
    saved and what its evaluations scored."""
    from tests.evaluated import assert_evaluated_model_is_saved

    model_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, LOCAL, "--num_workers=2", "--timeout=400", "--",
                             f"--model_dir={model_dir}", *tiny_flags()],
                            cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    printed = re.findall(r"^\[worker (\d)\] worker\1: step 6, weights sha256 (\w+) \(1 replica\)$", result.stdout, re.M)
    assert len(printed) == 2 and len({fp for _, fp in printed}) == 1, result.stdout[-3000:]
    assert_evaluated_model_is_saved(model_dir, tmp_path)


@pytest.mark.slow
def test_doctor_on_a_two_worker_cluster(tmp_path):
    """`segtrain doctor` started as the job starts: every check passes on both workers, the
    all-reduce is measured, and both end with one fingerprint."""
    model_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, LOCAL, "--num_workers=2", "--command=doctor", "--timeout=300", "--",
                             f"--model_dir={model_dir}", "--gin_file=gin/quickstart.gin"],
                            cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    for i in (0, 1):
        rows = dict(re.findall(rf"^\[worker {i}\] (\S+(?: \S+)*?) +(ok|FAIL|info|skip) ", result.stdout, re.M))
        assert rows == {"versions": "info", "cluster": "ok", "devices": "ok", "precision": "ok", "all-reduce": "ok",
                        "1 vs N replicas": "ok", "replicas agree": "ok", "model_dir": "ok"}, result.stdout[-3000:]
        assert f"[worker {i}] doctor: every check passed" in result.stdout
    assert re.search(r"^\[worker 0\] cluster +ok +\w+: worker 0 \(chief\) of 2 tasks", result.stdout, re.M)
    assert re.search(r"^\[worker 0\] all-reduce +ok +SUM over 2 replicas correct; 16 MiB in [\d.]+ ms: [\d.]+ GB/s",
                     result.stdout, re.M)
    assert len(set(re.findall(r"replicas agree +ok .*\(sha256 (\w+)\)", result.stdout))) == 1
    assert "[worker 1] model_dir        ok     not written by this task" in result.stdout
    assert not model_dir.exists(), "the doctor writes nothing into model_dir"


# A stand-in worker: on SIGTERM it "saves" and exits 143 as segtrain's preemption does (or, with
# IGNORE=1, ignores SIGTERM). With FAIL, worker 1 fails once worker 0 is up (its file in READY).
FAKE_WORKER = """
import json, os, signal, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
def saved(signum, frame):
    print(f"worker {index} saved on SIGTERM", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("IGNORE") else saved)
print("up", flush=True)
if os.environ.get("READY"):
    open(os.path.join(os.environ["READY"], str(index)), "w").close()
if index == 1 and os.environ.get("FAIL"):
    while not os.path.exists(os.path.join(os.environ["READY"], "0")):
        time.sleep(0.05)
    if os.environ["FAIL"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(3)
time.sleep(60)
"""


def test_a_failing_worker_stops_the_launch(monkeypatch, capsys, tmp_path):
    # Worker 1 fails at once; worker 0 would run for a minute: it gets SIGTERM and exits with its
    # own message. Not waiting a minute is the point (the bound is generous).
    monkeypatch.setenv("FAIL", "exit")
    monkeypatch.setenv("READY", str(tmp_path))
    t0 = time.monotonic()
    status = local.launch(2, [sys.executable, "-c", FAKE_WORKER], timeout=120)
    assert status == 3 and time.monotonic() - t0 < 30
    out, err = capsys.readouterr()
    assert "launch: worker 1 exited with status 3; stopping the other workers" in err
    assert "[worker 0] worker 0 saved on SIGTERM" in out and "launch: worker 0 exited with status 143." in err


def test_a_killed_worker_is_named_and_a_deaf_one_killed_after_grace(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FAIL", "kill")
    monkeypatch.setenv("READY", str(tmp_path))
    monkeypatch.setenv("IGNORE", "1")  # worker 0 ignores SIGTERM: SIGKILL after --grace
    status = local.launch(2, [sys.executable, "-c", FAKE_WORKER], timeout=120, grace=1)
    _, err = capsys.readouterr()
    assert status == 137  # 128 + SIGKILL, as a shell reports it
    assert "launch: worker 1 was killed by signal 9 (SIGKILL); stopping the other workers (SIGTERM, then " \
           "SIGKILL after --grace=1 s)." in err
    assert "launch: worker 0 did not exit within --grace=1 s of SIGTERM; killed it (SIGKILL)." in err
    assert local.describe_exit(-15) == "was killed by signal 15 (SIGTERM)" and local.exit_status(-15) == 143


def _launcher(grace: float, **env):
    """A launcher process running two FAKE_WORKERs, once both said they are up."""
    code = (f"import sys; sys.path.insert(0, {os.path.join(REPO, 'launch')!r}); import local; "
            f"sys.exit(local.launch(2, [sys.executable, '-c', {FAKE_WORKER!r}], grace={grace}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, **env))
    lines = []
    while sum(line.endswith("] up\n") for line in lines) < 2:
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    return proc, lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_launcher_lets_every_worker_save_and_returns_their_status(sig):
    proc, lines = _launcher(grace=30)
    try:
        proc.send_signal(sig)
        out = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, out  # every worker saved: their status, not 130
    assert f"launch: received {sig.name}; sending SIGTERM to the workers" in out
    for i in (0, 1):
        assert f"[worker {i}] worker {i} saved on SIGTERM" in out
        assert f"launch: worker {i} exited with status 143." in out


def test_a_second_signal_stops_the_workers_at_once():
    proc, lines = _launcher(grace=120, IGNORE="1")
    t0 = time.monotonic()
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 137, out
    assert out.count("did not exit within --grace=120 s of SIGTERM; killed it (SIGKILL).") == 2
    assert time.monotonic() - t0 < 60  # not the 120 s grace (a generous bound)


def test_launch_timeout_stops_every_worker():
    status = local.launch(2, [sys.executable, "-c", "import time; time.sleep(60)"], timeout=2)
    assert status == 124


def test_workers_get_one_cluster_with_free_ports():
    configs = [json.loads(c) for c in local.tf_configs(3)]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"] == configs[0]["cluster"] for c in configs)
    assert local.train_command(["--model_dir=x"])[-1] == "--strategy=multi_worker"
    assert local.train_command(["--strategy=auto"])[-1] == "--strategy=auto"


def test_launcher_usage_errors():
    for args in (["--num_workers=0", "--", "--model_dir=x"], ["--num_workers=2"],
                 ["--num_workers=2", "--grace=-1", "--", "--model_dir=x"]):
        result = subprocess.run([sys.executable, LOCAL, *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and "usage: python launch/local.py" in result.stderr


@pytest.mark.slow
def test_a_worker_whose_peer_never_starts_fails_with_the_address(tmp_path):
    import socket

    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = [a.getsockname()[1], b.getsockname()[1]]
    workers = [f"127.0.0.1:{p}" for p in ports]
    tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}})
    result = segtrain_cli("train", f"--model_dir={tmp_path}", *tiny_flags("distribute.connect_timeout = 5"),
                          env={"TF_CONFIG": tf_config}, timeout=120)
    assert result.returncode != 0
    assert (f"error: TF_CONFIG task worker 0 ({workers[0]}) could not form its cluster within 5 s "
            f"(distribute.connect_timeout): cannot connect to worker 1 at {workers[1]}.") in result.stderr
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.slow
def test_malformed_tf_config_is_one_clear_error(tmp_path):
    result = segtrain_cli("train", f"--model_dir={tmp_path}", *tiny_flags(),
                          env={"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
                                            '"task": {"type": "worker", "index": 5}}'})
    error = assert_user_error(result)
    assert error == "error: TF_CONFIG task index 5 is outside cluster['worker'], which has 2 address(es): use 0..1."


def test_slurm_script():
    path = os.path.join(REPO, "launch", "slurm.sbatch")
    subprocess.run(["bash", "-n", path], check=True)  # it parses
    text = open(path).read()
    assert "#SBATCH --ntasks-per-node=1" in text and "srun " in text
    # auto: a one-node job just trains (mirrored), several nodes form a cluster
    assert "--strategy=auto" in text and "distribute.slurm_gpus_per_node" in text
    # every task of the job (nodes x tasks per node), not one per node: the per-GPU layout
    assert 'distribute.num_workers = ${NUM_WORKERS:-${SLURM_NTASKS:-1}}' in text
    assert "distribute.slurm_ports = '${SEGTRAIN_PORTS:-node}'" in text
    assert "srun --kill-on-bad-exit=1 " in text  # the job's own --ntasks-per-node
    result = subprocess.run(["bash", path], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage: sbatch" in result.stderr


def test_kubernetes_tfjob():
    with open(os.path.join(REPO, "launch", "kubernetes", "tfjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "TFJob")
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] >= 2 and worker["restartPolicy"] in ("OnFailure", "ExitCode")
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "tensorflow"  # the name the operator expects
    assert container["command"] == ["segtrain", "train"] and "--strategy=multi_worker" in container["args"]
    assert any(a.startswith("--model_dir=/runs/") for a in container["args"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in worker["template"]["spec"]["volumes"]}
    assert mounts == {"runs": "/runs"} and volumes == {"runs"}
    assert "nvidia.com/gpu" in container["resources"]["limits"]
    # The image is launch/Dockerfile's, and what the args name is in it.
    assert container["image"] == "segtrain:latest" and container["imagePullPolicy"] == "IfNotPresent"
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] in ("Running", "All", "None")
    gin_files = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--gin_file=")]
    assert gin_files and all(f.startswith("/app/") and os.path.isfile(os.path.join(REPO, f[len("/app/"):]))
                             for f in gin_files), gin_files


def _dockerfile() -> list[tuple[str, str]]:
    """launch/Dockerfile as (instruction, arguments), continuation lines joined."""
    with open(os.path.join(REPO, "launch", "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_dockerfile_installs_segtrain_on_tensorflow_2_21_gpu():
    steps = _dockerfile()
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG")
    assert re.fullmatch(r"tensorflow/tensorflow:2\.(2[1-9]|[3-9]\d)\.\d+-gpu", args["TF_IMAGE"])
    assert ("FROM", "${TF_IMAGE}") in steps and ("WORKDIR", "/app") in steps
    copied = {source.rstrip("/") for kind, a in steps if kind == "COPY" for source in a.split()[:-1]}
    # what setup.cfg installs, and the paths the launchers name (/app/gin, /app/launch)
    assert {"registry", "segtrain", "gin", "launch", "setup.cfg", "pyproject.toml", "README.md"} <= copied
    for path in copied:
        assert os.path.exists(os.path.join(REPO, path)), path
    installs = [a for kind, a in steps if kind == "RUN" and "pip install" in a]
    assert installs and "/app" in installs[0]
    assert ("ENTRYPOINT", '["segtrain"]') in steps
    # The build context is the repository: what the image copies is not ignored.
    with open(os.path.join(REPO, "launch", "Dockerfile.dockerignore")) as f:
        kept = {line[1:].rstrip("/") for line in f.read().splitlines() if line.startswith("!")}
    assert copied <= kept, copied - kept


def test_a_port_in_use_is_one_error_before_any_server_starts(tmp_path):
    import socket

    (peer,) = free_ports(1)
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        tf_config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}", f"127.0.0.1:{peer}"]},
                                "task": {"type": "worker", "index": 0}})
        result = segtrain_cli("train", f"--model_dir={tmp_path}", *tiny_flags(), env={"TF_CONFIG": tf_config})
    assert_user_error(result, f"worker 0 (from TF_CONFIG) cannot listen on 127.0.0.1:{port}: port {port} is in use")
    assert not (tmp_path / "checkpoint").exists()
