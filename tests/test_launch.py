"""The launchers: real 2-process multi-worker training on 127.0.0.1, SLURM and Kubernetes files."""

from __future__ import annotations

import pytest

import json
import os
import re
import subprocess
import sys
import time

import yaml

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
def test_two_workers_train_to_identical_weights_and_only_the_chief_writes(tmp_path):
    model_dir = tmp_path / "run"
    flags = tiny_flags("models.unet.synchronized_batch_norm = True")
    result = subprocess.run(
        [sys.executable, LOCAL, "--num_workers=2", "--timeout=400", "--", *flags, f"--model_dir={model_dir}"],
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=500,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    fingerprints = dict(re.findall(r"^\[worker \d\] (worker\d): step 6, weights sha256 (\w+)$", result.stdout, re.M))
    assert set(fingerprints) == {"worker0", "worker1"}, result.stdout[-3000:]
    assert fingerprints["worker0"] == fingerprints["worker1"]
    assert "launch: all 2 workers finished." in result.stdout
    # The chief's files, once; the other worker's scratch directory is gone.
    assert (model_dir / "ckpt-6.index").exists() and (model_dir / "best" / "best.json").exists()
    assert len(list((model_dir / "train").glob("events.out.tfevents.*"))) == 1
    assert (model_dir / "operative_config.gin").exists()
    assert list((tmp_path / "scratch").iterdir()) == []
    # Evaluation of the multi-worker run on one machine works from the chief's checkpoint.
    evaluated = segtrain_cli("evaluate", f"--model_dir={model_dir}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]

    # A relaunch with more steps: every worker resumes from the chief's checkpoint.
    result = subprocess.run(
        [sys.executable, LOCAL, "--num_workers=2", "--timeout=400", "--", *flags, "--gin_param=train.num_steps = 9",
         f"--model_dir={model_dir}"],
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=500,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    for i in (0, 1):
        assert f"[worker {i}] Resuming {model_dir} from ckpt-6 at step 6" in result.stdout
    fingerprints = dict(re.findall(r"^\[worker \d\] (worker\d): step 9, weights sha256 (\w+)$", result.stdout, re.M))
    assert len(set(fingerprints.values())) == 1 and len(fingerprints) == 2
    assert (model_dir / "ckpt-9.index").exists() and list((tmp_path / "scratch").iterdir()) == []


@pytest.mark.slow
def test_a_failing_worker_stops_the_launch(tmp_path):
    # Worker 1 fails at once; worker 0 would run for a minute: the launcher must not wait for it.
    code = ("import json, os, sys, time\n"
            "index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
            "print('worker up', flush=True)\n"
            "sys.exit(3) if index == 1 else time.sleep(60)\n")
    t0 = time.monotonic()
    status = local.launch(2, [sys.executable, "-c", code], timeout=120)
    assert status == 3 and time.monotonic() - t0 < 30


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
    for args in (["--num_workers=0", "--", "--model_dir=x"], ["--num_workers=2"]):
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
    assert "--strategy=multi_worker" in text and "distribute.slurm_gpus_per_node" in text
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
