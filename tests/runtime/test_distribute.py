"""Cluster descriptions, strategy choice and chief election, without starting a cluster."""

from __future__ import annotations

import json
import os
import socket

import pytest
import tensorflow as tf

from segtrain.errors import SegtrainError, user_message
from segtrain.runtime import cluster as C
from segtrain.runtime import distribute as D
from segtrain.runtime import watchdog

TWO_WORKERS = {"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}, "task": {"type": "worker", "index": 1}}


@pytest.fixture
def gpus(monkeypatch):
    """gpus(list): the GPUs build_strategy sees (nothing pinned: no SLURM step is real here)."""
    monkeypatch.setattr(D, "pin_slurm_task_gpus", lambda *args: None)

    def see(found):
        monkeypatch.setattr(D, "visible_gpus", lambda: list(found))

    see([])
    return see


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    for name in ("TF_CONFIG", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                 "SLURM_STEP_TASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_LOCALID", "SLURM_NODEID"):
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


def test_task_type_outside_the_cluster(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({**TWO_WORKERS, "task": {"type": "evaluator", "index": 0}}))
    with pytest.raises(SegtrainError) as e:
        C.cluster_from_tf_config()
    assert str(e.value) == "TF_CONFIG task type 'evaluator' is not in its cluster (types: ['worker'])."


def test_num_workers_must_match_the_slurm_step(monkeypatch):
    _fake_slurm(monkeypatch, procid=0)  # 2 tasks, while the job asked for 4 workers
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    with pytest.raises(SegtrainError) as e:
        D.detect_cluster(slurm_gpus_per_node=1, num_workers=4)
    assert str(e.value) == (
        "distribute.num_workers=4, but the SLURM step has 2 task(s) (SLURM_STEP_NUM_TASKS=2, "
        "SLURM_JOB_NUM_NODES=2): ask sbatch for --nodes and --ntasks-per-node whose product is 4 "
        "(launch/slurm.sbatch starts every task the job has), or set distribute.num_workers = 2 (launch/slurm.sbatch: NUM_WORKERS=2).")
    assert D.detect_cluster(slurm_gpus_per_node=1, num_workers=2).num_tasks == 2


def test_num_workers_must_match_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))
    with pytest.raises(SegtrainError) as e:
        D.build_strategy("multi_worker", num_workers=3)
    assert user_message(e.value) == (
        "distribute.num_workers=3, but TF_CONFIG describes 2 task(s) (worker: 2): give TF_CONFIG's cluster "
        "3 addresses (launch/local.py --num_workers=3), or set distribute.num_workers = 2.")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_workers": 2}, "distribute.num_workers=2, but no cluster is described here (TF_CONFIG is unset and "
                         "this is not a SLURM step), so this is 1 worker"),
    ({"num_workers": 0}, "distribute.num_workers=0: use an integer >= 1, or None"),
    ({"heartbeat_timeout": 0}, "distribute.heartbeat_timeout=0: use a number of seconds > 0."),
    ({"collective_timeout": -1}, "distribute.collective_timeout=-1: use a number of seconds > 0, or None"),
])
def test_bad_cluster_settings(kwargs, message):
    with pytest.raises(SegtrainError) as e:
        D.build_strategy(**kwargs)
    assert message in str(e.value)


def test_one_worker_without_a_cluster_is_fine(gpus):
    assert D.build_strategy("auto", num_workers=1) is tf.distribute.get_strategy()
    # A strategy of one machine looks for no cluster (evaluating a multi-worker run does that).
    assert isinstance(D.build_strategy("one_device", num_workers=4), tf.distribute.OneDeviceStrategy)


def test_tf_config_wins_over_slurm_when_they_agree(monkeypatch):
    _fake_slurm(monkeypatch, procid=1)
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))
    assert D.detect_cluster().source == "TF_CONFIG"


def test_tf_config_and_slurm_that_disagree_are_refused(monkeypatch, gpus):
    _fake_slurm(monkeypatch, procid=0)  # TF_CONFIG makes this worker 1
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))
    with pytest.raises(SegtrainError) as e:
        D.build_strategy("auto")
    assert user_message(e.value) == (
        "TF_CONFIG and the SLURM step describe different clusters: TF_CONFIG has 2 task(s) and makes this "
        "worker 1 (rank 1), the SLURM step has 2 task(s) and makes this SLURM_PROCID=0. TF_CONFIG wins when "
        "both are set, so its workers would not be SLURM's: unset TF_CONFIG in the job script (`unset "
        "TF_CONFIG` before srun) to train on the SLURM step, or start the workers without srun to train on "
        "TF_CONFIG.")


def test_a_one_task_slurm_step_does_not_contradict_tf_config(monkeypatch):
    # launch/local.py inside `srun --pty bash`: a 1-task step around a 2-worker TF_CONFIG
    _fake_slurm(monkeypatch, procid=0, nodes="gpu07", tasks="1", num_tasks=1)
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))
    assert D.detect_cluster().spec == TWO_WORKERS["cluster"]


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "horovod"}, "--strategy='horovod' is not one of auto, one_device, mirrored, multi_worker."),
    ({"strategy": "one_device", "cpu_replicas": 2}, "does not combine with --strategy=one_device"),
    ({"strategy": "multi_worker", "cpu_replicas": 2}, "does not combine with --strategy=multi_worker"),
    ({"strategy": "mirrored", "cpu_replicas": 2, "visible": ["fake GPU"]},
     "--cpu_replicas=2 is for machines without GPUs, and this one has 1"),
    ({"strategy": "mirrored", "cpu_replicas": -1}, "--cpu_replicas=-1: use an integer >= 0"),
    ({"strategy": "multi_worker"}, "--strategy=multi_worker needs a cluster: set TF_CONFIG"),
])
def test_bad_strategy_settings(kwargs, message, gpus):
    gpus(kwargs.pop("visible", []))
    with pytest.raises(SegtrainError) as e:
        D.build_strategy(**kwargs)
    assert message in str(e.value)


def test_cpu_replicas_with_a_cluster_is_refused(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))
    with pytest.raises(SegtrainError, match="does not combine with a multi-worker cluster"):
        D.build_strategy("auto", cpu_replicas=2)


def test_auto_without_cluster_or_gpus_is_the_default_strategy(gpus):
    assert D.build_strategy("auto") is tf.distribute.get_strategy()


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


def test_a_killed_workers_scratch_directory_is_removed_by_the_next(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that ran and ended
    orphan, alive = tmp_path / f"segtrain-worker1-{gone}-abc", tmp_path / f"segtrain-worker1-{os.getpid()}-def"
    for path in (orphan, alive):
        (path / "ckpt-4.index").parent.mkdir()
        (path / "ckpt-4.index").write_text("x")
    other = D.WriteDir(str(tmp_path / "run"), _FakeStrategy({"worker": ["h:1", "h:2"]}, "worker", 1))
    assert not orphan.exists() and alive.exists()  # a running job's directory stays
    other.cleanup()


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


# What survivors of a lost peer got from TensorFlow 2.21 on 127.0.0.1 (trimmed): the peer's
# process was killed (its connection closed), or stopped (no heartbeats), or the chief was.
CLOSED = (
    "Graph execution error:\n\n"
    "Detected at node while/adam/CollectiveReduceV2 defined at (most recent call last):\n"
    '  File "segtrain/train/trainer.py", line 141, in _loop\n\n'
    "Collective ops is aborted by: Socket closed\n"
    "Additional GRPC error information from remote target /job:worker/replica:0/task:1 while calling "
    "/tensorflow.WorkerService/RecvBuf:\n"
    ':UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"Socket closed"}\n'
    "The error could be from a previous operation. Restart your program to reset.\n"
    "\t [[{{node while/adam/CollectiveReduceV2}}]] [Op:__inference__loop_8484]"
)
SILENT = (
    "Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are "
    "unhealthy (stopped sending heartbeats):\n"
    "/job:worker/replica:0/task:1\n"
    "The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. "
    "preemption, eviction) to debug further."
)
SILENT_CHIEF = "Collective ops is aborted by: Deadline Exceeded\nRPC: /tensorflow.CoordinationService/Heartbeat"
SPEC = {"worker": ["127.0.0.1:2222", "127.0.0.1:2223", "127.0.0.1:2224"]}


@pytest.mark.parametrize("text, me, expected", [
    (CLOSED, ("worker", 0), "lost worker 1 (127.0.0.1:2223) at about step 12: the connection to it failed "
                            "(Socket closed)."),
    (SILENT, ("worker", 0), "lost worker 1 (127.0.0.1:2223) at about step 12: it stopped sending heartbeats "
                            "(distribute.heartbeat_timeout)."),
    (SILENT_CHIEF, ("worker", 2), "lost worker 0 (127.0.0.1:2222), the chief (it hosts the coordination service) "
                                  "at about step 12: it stopped answering heartbeats (distribute.heartbeat_timeout)."),
    ("Collective ops is aborted by: Collective has timed out during execution.", ("worker", 1),
     "lost contact with the cluster (one of worker 0 (127.0.0.1:2222), the chief (it hosts the coordination "
     "service), worker 2 (127.0.0.1:2224)) at about step 12: a collective timed out waiting for it "
     "(distribute.collective_timeout)."),
    ("Collective ops is aborted by: Connection reset", ("worker", 1),
     "lost contact with the cluster (one of worker 0 (127.0.0.1:2222), the chief (it hosts the coordination "
     "service), worker 2 (127.0.0.1:2224)) at about step 12: Collective ops is aborted by: Connection reset."),
])
def test_lost_peer_message_names_the_lost_task(text, me, expected):
    message = D.lost_peer_message(text, SPEC, me, 12, "/runs/x/ckpt-8")
    assert message.startswith(expected), message
    assert message.endswith(f"so worker {me[1]} stops too; the lost task's own output says why it stopped. "
                            f"Relaunch the job: every worker resumes from the chief's last checkpoint ckpt-8.")
    assert "no checkpoint was written yet, so it starts from step 0." in D.lost_peer_message(text, SPEC, me, 3, None)


def test_the_one_peer_of_a_two_task_cluster_is_the_lost_one():
    message = D.lost_peer_message("Collective ops is aborted by: Collective has timed out during execution.",
                                  {"worker": SPEC["worker"][:2]}, ("worker", 0), 12, None)
    assert message.startswith("lost worker 1 (127.0.0.1:2223) at about step 12: a collective timed out")


def test_only_the_errors_of_a_lost_peer_are_converted(tmp_path):
    lost = tf.errors.UnavailableError(None, None, CLOSED)
    assert D.peer_error(lost) is lost
    assert D.peer_error(tf.errors.InternalError(None, None, SILENT)) is not None
    # A checkpoint save that failed on the lost peer reports the peer, not the save.
    try:
        try:
            raise lost
        except tf.errors.OpError:
            raise SegtrainError("Could not write the checkpoint ckpt-8") from None
    except SegtrainError as e:
        assert D.peer_error(e) is lost
    # Not a peer: a data error naming this task's device, a remote file system, a plain bug.
    data = tf.errors.InvalidArgumentError(None, None, "bad label in /job:worker/replica:0/task:0/device:CPU:0")
    assert D.peer_error(data) is None
    assert D.peer_error(tf.errors.UnavailableError(None, None, "gs://bucket/x: service unavailable")) is None
    assert D.peer_error(ValueError("x")) is None


def test_lost_peers_raises_one_hard_exit_error_in_a_cluster_only():
    strategy = _FakeStrategy(SPEC, "worker", 0)
    with pytest.raises(D.LostPeer) as e:
        with D.lost_peers(strategy, lambda: 12, lambda: "/runs/x/ckpt-8"):
            raise tf.errors.UnavailableError(None, None, CLOSED)
    assert e.value.hard_exit and str(e.value).startswith("lost worker 1 (127.0.0.1:2223) at about step 12")
    with pytest.raises(tf.errors.UnavailableError):  # one process: nothing to name
        with D.lost_peers(tf.distribute.get_strategy(), lambda: 12, lambda: None):
            raise tf.errors.UnavailableError(None, None, CLOSED)
    with pytest.raises(tf.errors.InvalidArgumentError):
        with D.lost_peers(strategy, lambda: 12, lambda: None):
            raise tf.errors.InvalidArgumentError(None, None, "bad label")


# ---- cluster mistakes caught before the gRPC server starts ----------------------------------
def _cluster(addrs, index=0, source="TF_CONFIG"):
    return C.Cluster({"worker": list(addrs)}, "worker", index, source, resolver=None)


def _free_ports(n):
    return C.free_ports(n)


def test_a_cluster_of_free_resolvable_addresses_passes():
    a, b = _free_ports(2)
    C.check_addresses(_cluster([f"127.0.0.1:{a}", f"localhost:{b}"]))


@pytest.mark.parametrize("source, setting", [("TF_CONFIG", "TF_CONFIG's cluster"), ("SLURM", "SEGTRAIN_PORT=P")])
def test_a_port_in_use_names_the_task_address_and_the_setting(source, setting):
    (peer,) = _free_ports(1)
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(SegtrainError) as e:
            C.check_addresses(_cluster([f"127.0.0.1:{peer}", f"127.0.0.1:{port}"], index=1, source=source))
    message = str(e.value)
    assert message.startswith(f"worker 1 (from {source}) cannot listen on 127.0.0.1:{port}: port {port} is in use")
    assert setting in message


def test_an_unresolvable_host_is_named_with_its_task():
    a, b = _free_ports(2)
    with pytest.raises(SegtrainError) as e:
        C.check_addresses(_cluster([f"127.0.0.1:{a}", f"no-such-node.invalid:{b}"], source="SLURM"))
    assert str(e.value).startswith(
        f"Cluster (from SLURM): the host of worker 1, 'no-such-node.invalid' in no-such-node.invalid:{b}, does not resolve")
    assert "getent hosts" in str(e.value)


def test_two_tasks_at_one_address_are_refused_even_under_two_names():
    (port,) = _free_ports(1)
    # two node entries on one host with the same port: what SLURM gives each node's first task
    with pytest.raises(SegtrainError) as e:
        C.check_addresses(_cluster([f"127.0.0.1:{port}", f"localhost:{port}"], source="SLURM"))
    assert str(e.value).startswith(
        f"Cluster (from SLURM): worker 0 (127.0.0.1:{port}) and worker 1 (localhost:{port}) are the same "
        f"address 127.0.0.1:{port}, where only one task can listen.")


def test_a_one_node_slurm_job_trains_without_a_cluster(monkeypatch, gpus):
    # sbatch --nodes=1 launch/slurm.sbatch: one task, --strategy=auto, NUM_WORKERS = 1 node
    _fake_slurm(monkeypatch, procid=0, nodes="gpu07", tasks="1", num_tasks=1)
    assert D.build_strategy("auto", num_workers=1) is tf.distribute.get_strategy()
