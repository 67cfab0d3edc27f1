"""Cluster descriptions, strategy choice and chief election, without starting a cluster."""

from __future__ import annotations

import json
import socket

import pytest
import tensorflow as tf

from segtrain.errors import SegtrainError
from segtrain.train import distribute as D
from segtrain.train import watchdog

TWO_WORKERS = {"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}, "task": {"type": "worker", "index": 1}}


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    for name in ("TF_CONFIG", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                 "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)


def test_tf_config_cluster(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))
    cluster = D.detect_cluster()
    assert cluster.source == "TF_CONFIG" and (cluster.task_type, cluster.task_id) == ("worker", 1)
    assert cluster.address == "127.0.0.1:2223"
    assert cluster.peers() == [("worker 0", "127.0.0.1:2222")]
    assert cluster.resolver.cluster_spec().as_dict() == TWO_WORKERS["cluster"]


def test_a_single_task_is_not_a_cluster(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:2222"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert D.detect_cluster() is None


@pytest.mark.parametrize("tf_config, message", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), "TF_CONFIG has no 'cluster'"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:2222"]}}), "TF_CONFIG has no 'task'"),
    (json.dumps({**TWO_WORKERS, "task": {"type": "worker", "index": 2}}),
     "TF_CONFIG task index 2 is outside cluster['worker'], which has 2 address(es): use 0..1."),
    (json.dumps({**TWO_WORKERS, "task": {"type": "chief", "index": 0}}),
     "TF_CONFIG task type 'chief' is not in its cluster (types: ['worker'])."),
    (json.dumps({"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}),
     "TF_CONFIG cluster['worker'] = ['127.0.0.1']: expected a non-empty list of 'host:port' strings."),
    (json.dumps({"cluster": {"ps": ["h:1"], "worker": ["h:2"]}, "task": {"type": "worker", "index": 0}}),
     "MultiWorkerMirroredStrategy uses 'chief' and 'worker' tasks only"),
])
def test_bad_tf_config(monkeypatch, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(SegtrainError) as e:
        D.build_strategy("auto")
    assert message in str(e.value)


def _fake_slurm(monkeypatch, procid: int, nodes: str = "gpu[07-08]", tasks: str = "1(x2)", num_tasks: int = 2):
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", str(num_tasks))
    monkeypatch.setenv("SLURM_STEP_NODELIST", nodes)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", tasks)


def test_slurm_cluster_from_faked_environment(monkeypatch):
    _fake_slurm(monkeypatch, procid=1)
    cluster = D.detect_cluster(slurm_gpus_per_node=8, slurm_port_base=9000)
    assert cluster.source == "SLURM"
    assert cluster.spec == {"worker": ["gpu07:9000", "gpu08:9000"]}
    assert (cluster.task_type, cluster.task_id) == ("worker", 1)
    assert cluster.resolver.num_accelerators() == {"GPU": 8}  # the whole node for its one task
    assert cluster.resolver.cluster_spec().as_dict() == cluster.spec


def test_slurm_on_cpu_nodes(monkeypatch):
    _fake_slurm(monkeypatch, procid=0, nodes="cpu01", tasks="2", num_tasks=2)
    cluster = D.detect_cluster(slurm_gpus_per_node=0)
    assert cluster.spec == {"worker": ["cpu01:8888", "cpu01:8889"]}
    assert cluster.task_id == 0 and not cluster.resolver.num_accelerators()


def test_inconsistent_slurm_environment(monkeypatch):
    _fake_slurm(monkeypatch, procid=0, num_tasks=3)  # 3 tasks claimed, 2 placed
    with pytest.raises(SegtrainError, match="Could not resolve the SLURM cluster"):
        D.detect_cluster(slurm_gpus_per_node=1)


def test_tf_config_wins_over_slurm(monkeypatch):
    _fake_slurm(monkeypatch, procid=0)
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))
    assert D.detect_cluster().source == "TF_CONFIG"


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "horovod"}, "--strategy='horovod' is not one of auto, one_device, mirrored, multi_worker."),
    ({"strategy": "one_device", "cpu_replicas": 2}, "does not combine with --strategy=one_device"),
    ({"strategy": "multi_worker", "cpu_replicas": 2}, "does not combine with --strategy=multi_worker"),
    ({"strategy": "mirrored", "cpu_replicas": 2, "gpus": ["fake GPU"]},
     "--cpu_replicas=2 is for machines without GPUs, and this one has 1"),
    ({"strategy": "mirrored", "cpu_replicas": -1}, "--cpu_replicas=-1: use an integer >= 0"),
    ({"strategy": "multi_worker"}, "--strategy=multi_worker needs a cluster: set TF_CONFIG"),
])
def test_bad_strategy_settings(kwargs, message):
    with pytest.raises(SegtrainError) as e:
        D.build_strategy(**kwargs)
    assert message in str(e.value)


def test_cpu_replicas_with_a_cluster_is_refused(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))
    with pytest.raises(SegtrainError, match="does not combine with a multi-worker cluster"):
        D.build_strategy("auto", cpu_replicas=2)


def test_auto_without_cluster_or_gpus_is_the_default_strategy():
    assert D.build_strategy("auto", gpus=[]) is tf.distribute.get_strategy()


class _FakeStrategy:
    def __init__(self, spec, task_type, task_id):
        self.cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(spec), task_type=task_type, task_id=task_id)


def test_chief_election(tmp_path):
    workers = {"worker": ["h:1", "h:2"]}
    with_chief = {"chief": ["h:0"], "worker": ["h:1"]}
    assert D.is_chief(tf.distribute.get_strategy())
    assert D.is_chief(_FakeStrategy(workers, "worker", 0))
    assert not D.is_chief(_FakeStrategy(workers, "worker", 1))
    assert D.is_chief(_FakeStrategy(with_chief, "chief", 0))
    assert not D.is_chief(_FakeStrategy(with_chief, "worker", 0))

    chief = D.WriteDir(str(tmp_path), _FakeStrategy(workers, "worker", 0))
    other = D.WriteDir(str(tmp_path), _FakeStrategy(workers, "worker", 1))
    assert chief.path == str(tmp_path) and other.path != str(tmp_path) and "worker1" in other.path
    other.cleanup()
    chief.cleanup()
    assert tmp_path.exists() and not __import__("os").path.exists(other.path)


def test_watchdog_names_the_unreachable_peer():
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refuses connections
        up, down = (f"127.0.0.1:{s.getsockname()[1]}" for s in (listening, closed))
        info = {"task": f"worker 0 ({up})", "source": "TF_CONFIG", "peers": [["worker 1", up], ["worker 2", down]]}
        text = watchdog.message(info, 30)
    assert text.startswith(f"error: TF_CONFIG task worker 0 ({up}) could not form its cluster within 30 s")
    assert f"cannot connect to worker 2 at {down}." in text and "worker 1" not in text
