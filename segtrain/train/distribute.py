"""Strategies and clusters: which tf.distribute strategy a run uses, and which worker is chief.

    auto          MultiWorkerMirroredStrategy when TF_CONFIG or a SLURM step describes several
                  tasks; else MirroredStrategy over all GPUs when there are 2 or more (or over
                  ``cpu_replicas`` logical CPU devices); else the default strategy.
    one_device    one device: the first GPU, else the CPU.
    mirrored      MirroredStrategy over all local GPUs, or ``cpu_replicas`` CPU devices.
    multi_worker  MultiWorkerMirroredStrategy; the cluster comes from TF_CONFIG or SLURM.

The cluster engine is tf.distribute's own (collective all-reduce over gRPC); this module only
finds the cluster description, checks it and bounds the wait for peers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import gin
import tensorflow as tf

from segtrain.errors import SegtrainError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")


@dataclass(frozen=True)
class Cluster:
    """Where this process stands in a cluster.

    Attributes:
      spec: {task_type: ["host:port", ...]}.
      task_type, task_id: this process's task.
      source: 'TF_CONFIG' or 'SLURM' (for messages).
      resolver: the tf.distribute cluster resolver that describes it.
    """

    spec: dict
    task_type: str
    task_id: int
    source: str
    resolver: tf.distribute.cluster_resolver.ClusterResolver

    @property
    def num_tasks(self) -> int:
        return sum(len(v) for v in self.spec.values())

    @property
    def address(self) -> str:
        return self.spec[self.task_type][self.task_id]

    @property
    def is_chief(self) -> bool:
        """The task that writes: the chief, else worker 0 when the cluster has no chief."""
        return chief_task(self.task_type, self.task_id, self.spec)

    def peers(self) -> list[tuple[str, str]]:
        """[(name, "host:port")] of every other task."""
        return [(f"{kind} {i}", addr) for kind, addrs in self.spec.items() for i, addr in enumerate(addrs)
                if (kind, i) != (self.task_type, self.task_id)]


def cluster_from_tf_config() -> Cluster | None:
    """The cluster TF_CONFIG describes, or None when TF_CONFIG is unset or empty.

    Raises:
      SegtrainError: TF_CONFIG is not JSON, lacks 'cluster' or 'task', or names a task
        outside its cluster.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SegtrainError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]!r}") from None
    example = ('{"cluster": {"worker": ["host0:port", "host1:port"]}, '
               '"task": {"type": "worker", "index": 0}}')
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) or not config["cluster"]:
        raise SegtrainError(f"TF_CONFIG has no 'cluster' mapping of task types to addresses; expected e.g. {example}")
    spec = config["cluster"]
    for kind, addrs in spec.items():
        if not isinstance(addrs, list) or not addrs or not all(_is_address(a) for a in addrs):
            raise SegtrainError(
                f"TF_CONFIG cluster[{kind!r}] = {addrs!r}: expected a non-empty list of 'host:port' strings."
            )
        if kind not in ("chief", "worker"):
            raise SegtrainError(
                f"TF_CONFIG cluster has task type {kind!r}: MultiWorkerMirroredStrategy uses 'chief' "
                f"and 'worker' tasks only."
            )
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        raise SegtrainError(f"TF_CONFIG has no 'task' with a 'type' and an 'index'; expected e.g. {example}")
    kind, index = task["type"], task.get("index", 0)
    if kind not in spec:
        raise SegtrainError(
            f"TF_CONFIG task type {kind!r} is not in its cluster (types: {sorted(spec)})."
        )
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(spec[kind]):
        raise SegtrainError(
            f"TF_CONFIG task index {index!r} is outside cluster[{kind!r}], which has "
            f"{len(spec[kind])} address(es): use 0..{len(spec[kind]) - 1}."
        )
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return Cluster(spec, kind, index, "TF_CONFIG", resolver)


def _is_address(value) -> bool:
    if not isinstance(value, str) or ":" not in value:
        return False
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def cluster_from_slurm(gpus_per_node: int | None = None, port_base: int = 8888) -> Cluster | None:
    """The cluster of the SLURM job step this process runs in, or None outside SLURM.

    One task per node is the intended layout (launch/slurm.sbatch): each task drives all the
    GPUs of its node with one MultiWorkerMirroredStrategy worker.

    Raises:
      SegtrainError: the SLURM variables are incomplete or inconsistent.
    """
    if "SLURM_PROCID" not in os.environ or "SLURM_STEP_NUM_TASKS" not in os.environ:
        return None
    if gpus_per_node is None:
        gpus_per_node = len(tf.config.list_physical_devices("GPU"))
    try:
        counts = [int(part.split("(")[0]) for part in os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1").split(",")]
        most = max(counts)
        # SlurmClusterResolver assigns GPUs to tasks; on CPU nodes it gets one placeholder per
        # task (auto_set_gpu is off, so it changes nothing) and the strategy is told the truth.
        per_node = max(gpus_per_node, most)
        slurm = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=port_base, gpus_per_node=per_node, gpus_per_task=per_node // most, auto_set_gpu=False
        )
        spec = slurm.cluster_spec()
    except (RuntimeError, ValueError, KeyError) as e:
        raise SegtrainError(f"Could not resolve the SLURM cluster from the SLURM_* variables: {e}") from None
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type=slurm.task_type, task_id=slurm.task_id, rpc_layer="grpc",
        num_accelerators={"GPU": gpus_per_node // most} if gpus_per_node else None,
    )
    return Cluster(spec.as_dict(), slurm.task_type, int(slurm.task_id), "SLURM", resolver)


def detect_cluster(slurm_gpus_per_node: int | None = None, slurm_port_base: int = 8888) -> Cluster | None:
    """A cluster of two or more tasks from TF_CONFIG (first) or SLURM, else None."""
    cluster = cluster_from_tf_config()
    if cluster is None:
        cluster = cluster_from_slurm(slurm_gpus_per_node, slurm_port_base)
    return cluster if cluster is not None and cluster.num_tasks > 1 else None


def split_cpu(replicas: int) -> list[str]:
    """Splits the CPU into ``replicas`` logical devices; returns their names.

    Raises:
      SegtrainError: TensorFlow already initialised its devices with another split.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * replicas
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) != replicas:
            raise SegtrainError(
                f"--cpu_replicas={replicas} must be set before TensorFlow starts: it cannot split "
                f"the CPU now that its devices exist."
            ) from None
    return [f"/cpu:{i}" for i in range(replicas)]


@gin.configurable("distribute", denylist=["gpus"])
def build_strategy(
    strategy: str = "auto",
    cpu_replicas: int = 0,
    connect_timeout: float = 300.0,
    slurm_gpus_per_node: int | None = None,
    slurm_port_base: int = 8888,
    gpus: list | None = None,
) -> tf.distribute.Strategy:
    """Creates the strategy a run trains under (call before TensorFlow touches its devices).

    Args:
      strategy: 'auto', 'one_device', 'mirrored' or 'multi_worker' (see the module doc).
      cpu_replicas: split the CPU into this many logical devices and mirror over them (tests and
        CPU-only machines; 0: off). Only with 'auto' or 'mirrored' and no GPU.
      connect_timeout: seconds a multi-worker task waits for its peers before it stops with an
        error naming the ones it cannot reach.
      slurm_gpus_per_node: GPUs per node of a SLURM job (default: those visible here).
      slurm_port_base: port of each SLURM task's gRPC server.
      gpus: the visible GPUs (default: tf.config.list_physical_devices('GPU')); for tests.

    Raises:
      SegtrainError: an unknown strategy, cpu_replicas with a GPU strategy or on a GPU machine,
        a bad cluster description, or peers that cannot be reached in time.
    """
    if strategy not in STRATEGIES:
        raise SegtrainError(f"--strategy={strategy!r} is not one of {', '.join(STRATEGIES)}.")
    if isinstance(cpu_replicas, bool) or not isinstance(cpu_replicas, int) or cpu_replicas < 0:
        raise SegtrainError(f"--cpu_replicas={cpu_replicas!r}: use an integer >= 0 (0: off).")
    gpus = tf.config.list_physical_devices("GPU") if gpus is None else gpus
    cluster = detect_cluster(slurm_gpus_per_node, slurm_port_base) if strategy in ("auto", "multi_worker") else None
    if cpu_replicas:
        if strategy not in ("auto", "mirrored") or cluster is not None:
            what = "a multi-worker cluster" if cluster is not None else f"--strategy={strategy}"
            raise SegtrainError(
                f"--cpu_replicas={cpu_replicas} splits one machine's CPU for MirroredStrategy; it does "
                f"not combine with {what}. Use --strategy=mirrored (or auto) without a cluster."
            )
        if gpus:
            raise SegtrainError(
                f"--cpu_replicas={cpu_replicas} is for machines without GPUs, and this one has "
                f"{len(gpus)}: leave it out and --strategy=mirrored uses the GPUs."
            )
        return tf.distribute.MirroredStrategy(split_cpu(cpu_replicas))
    if strategy == "multi_worker" or cluster is not None:
        if cluster is None:
            raise SegtrainError(
                "--strategy=multi_worker needs a cluster: set TF_CONFIG (launch/local.py and Kubeflow "
                "do) or run inside a SLURM step of 2 or more tasks (launch/slurm.sbatch)."
            )
        return _multi_worker(cluster, connect_timeout)
    if strategy == "one_device" or (strategy == "auto" and len(gpus) < 2):
        if strategy == "auto":
            return tf.distribute.get_strategy()
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    return tf.distribute.MirroredStrategy()


def _multi_worker(cluster: Cluster, timeout: float) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy, with a bounded wait for the peers.

    The constructor blocks in native code until every task has joined, and nothing inside this
    process can interrupt it: a watchdog process (segtrain.train.watchdog) ends the task with a
    message naming the unreachable peers when the wait runs out.
    """
    info = {"task": f"{cluster.task_type} {cluster.task_id} ({cluster.address})", "source": cluster.source,
            "peers": cluster.peers()}
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "segtrain.train.watchdog", str(os.getpid()), str(timeout), json.dumps(info)],
        stdin=subprocess.DEVNULL,
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster.resolver)
    finally:
        watchdog.kill()
        watchdog.wait()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the task that writes checkpoints and summaries: the chief, else worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return chief_task(resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict())


def chief_task(task_type: str, task_id: int, spec: dict) -> bool:
    """The one rule of who writes: the 'chief' task, else worker 0 of a cluster without a chief."""
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in spec


def task_name(strategy: tf.distribute.Strategy) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return "local"
    return f"{resolver.task_type}{resolver.task_id}"


class WriteDir:
    """Where this task writes: model_dir on the chief, a temporary directory elsewhere.

    Every worker must take part in saving (a save reads distributed variables), but only the
    chief's files are kept; the others' are removed by ``cleanup``.
    """

    def __init__(self, model_dir: str, strategy: tf.distribute.Strategy):
        self.model_dir = model_dir
        self.chief = is_chief(strategy)
        if self.chief:
            self.path = model_dir
        else:
            self.path = tempfile.mkdtemp(prefix=f"segtrain-{task_name(strategy)}-")

    def cleanup(self) -> None:
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)
