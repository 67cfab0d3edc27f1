"""Strategies and clusters: which tf.distribute strategy a run uses, and which worker is chief.

    auto          MultiWorkerMirroredStrategy when TF_CONFIG or a SLURM step describes several
                  tasks; else MirroredStrategy over all GPUs when there are 2 or more (or over
                  ``cpu_replicas`` logical CPU devices); else the default strategy.
    one_device    one device: the first GPU, else the CPU.
    mirrored      MirroredStrategy over all local GPUs, or ``cpu_replicas`` CPU devices.
    multi_worker  MultiWorkerMirroredStrategy; the cluster comes from TF_CONFIG or SLURM.

The cluster engine is tf.distribute's own (collective all-reduce over gRPC); this module only
finds the cluster description, checks it, bounds the wait for peers, sets how soon a lost peer
is noticed, and turns the error a lost peer causes into one message (``lost_peers``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

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


def detect_cluster(slurm_gpus_per_node: int | None = None, slurm_port_base: int = 8888,
                   num_workers: int | None = None) -> Cluster | None:
    """A cluster of two or more tasks from TF_CONFIG (first) or SLURM, else None.

    Args:
      num_workers: the number of tasks the cluster must have (None: any).

    Raises:
      SegtrainError: a bad cluster description, or one of another size than ``num_workers``.
    """
    cluster = cluster_from_tf_config()
    if cluster is None:
        cluster = cluster_from_slurm(slurm_gpus_per_node, slurm_port_base)
    if num_workers is not None:
        _check_size(cluster, num_workers)
    return cluster if cluster is not None and cluster.num_tasks > 1 else None


def _check_size(cluster: Cluster | None, num_workers: int) -> None:
    """Refuses a cluster of another size than distribute.num_workers, saying where its size came from."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise SegtrainError(f"distribute.num_workers={num_workers!r}: use an integer >= 1, or None for "
                            f"whatever the cluster description has.")
    found = cluster.num_tasks if cluster is not None else 1
    if found == num_workers:
        return
    asked = f"distribute.num_workers={num_workers}"
    if cluster is None:
        raise SegtrainError(
            f"{asked}, but no cluster is described here (TF_CONFIG is unset and this is not a SLURM "
            f"step), so this is 1 worker: start the workers with launch/local.py --num_workers="
            f"{num_workers}, launch/slurm.sbatch or a TFJob, or leave distribute.num_workers out."
        )
    if cluster.source == "SLURM":
        nodes = os.environ.get("SLURM_JOB_NUM_NODES")
        raise SegtrainError(
            f"{asked}, but the SLURM step has {found} task(s) (SLURM_STEP_NUM_TASKS="
            f"{os.environ.get('SLURM_STEP_NUM_TASKS')}"
            + (f", SLURM_JOB_NUM_NODES={nodes}" if nodes else "")
            + f"): ask sbatch for --nodes={num_workers} (launch/slurm.sbatch runs one task per node), "
            f"or set distribute.num_workers = {found} (launch/slurm.sbatch: NUM_WORKERS={found})."
        )
    counts = ", ".join(f"{kind}: {len(addrs)}" for kind, addrs in cluster.spec.items())
    raise SegtrainError(
        f"{asked}, but TF_CONFIG describes {found} task(s) ({counts}): give TF_CONFIG's cluster "
        f"{num_workers} addresses (launch/local.py --num_workers={num_workers}), or set "
        f"distribute.num_workers = {found}."
    )


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
    num_workers: int | None = None,
    heartbeat_timeout: float = 20.0,
    collective_timeout: float | None = None,
    gpus: list | None = None,
) -> tf.distribute.Strategy:
    """Creates the strategy a run trains under (call before TensorFlow touches its devices).

    A worker that dies (killed, out of memory, its machine gone) is noticed two ways. When its
    process ends, its machine closes its connections and every other worker's next collective
    fails at once. When its machine goes silent instead (power, network), the coordination
    service on the chief misses its heartbeats for ``heartbeat_timeout`` seconds and aborts
    every worker's collectives. Heartbeats come from TensorFlow's own threads, not from the
    training step, so a long first step (tracing, XLA compiling) or an evaluation does not
    delay them. Either way each survivor stops with one message naming the lost worker
    (``lost_peers``). A worker that hangs but still runs keeps sending heartbeats: only
    ``collective_timeout`` catches that.

    Args:
      strategy: 'auto', 'one_device', 'mirrored' or 'multi_worker' (see the module doc).
      cpu_replicas: split the CPU into this many logical devices and mirror over them (tests and
        CPU-only machines; 0: off). Only with 'auto' or 'mirrored' and no GPU.
      connect_timeout: seconds a multi-worker task waits for its peers before it stops with an
        error naming the ones it cannot reach.
      slurm_gpus_per_node: GPUs per node of a SLURM job (default: those visible here).
      slurm_port_base: port of each SLURM task's gRPC server.
      num_workers: the number of tasks the cluster must have (TF_CONFIG's addresses, or the
        SLURM step's tasks); another number stops the run before it starts (None: any). Only
        'auto' and 'multi_worker' look for a cluster, so only they check it.
      heartbeat_timeout: seconds without a heartbeat after which the coordination service
        declares a task lost. TensorFlow's default is 10; 20 leaves room for a loaded machine
        and stays under launch/local.py's --grace (30 s), so that a survivor the launcher
        stops still has time to notice the loss and say so.
      collective_timeout: seconds any one collective may take before it fails (None: no limit).
        Only for hunting hangs: TensorFlow starts a timer thread per collective, and the limit
        must exceed the longest time a worker waits at a collective for the others, e.g. while
        the chief writes a checkpoint or summaries.
      gpus: the visible GPUs (default: tf.config.list_physical_devices('GPU')); for tests.

    Raises:
      SegtrainError: an unknown strategy, cpu_replicas with a GPU strategy or on a GPU machine,
        a bad cluster description or one of another size than num_workers, bad timeouts, or
        peers that cannot be reached in time.
    """
    if strategy not in STRATEGIES:
        raise SegtrainError(f"--strategy={strategy!r} is not one of {', '.join(STRATEGIES)}.")
    if isinstance(cpu_replicas, bool) or not isinstance(cpu_replicas, int) or cpu_replicas < 0:
        raise SegtrainError(f"--cpu_replicas={cpu_replicas!r}: use an integer >= 0 (0: off).")
    for name, value, optional in (("heartbeat_timeout", heartbeat_timeout, False),
                                  ("collective_timeout", collective_timeout, True)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (optional and value is None) and not (number and value > 0):
            raise SegtrainError(f"distribute.{name}={value!r}: use a number of seconds > 0"
                                + (", or None for no limit." if optional else "."))
    gpus = tf.config.list_physical_devices("GPU") if gpus is None else gpus
    cluster = (detect_cluster(slurm_gpus_per_node, slurm_port_base, num_workers)
               if strategy in ("auto", "multi_worker") else None)
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
        return _multi_worker(cluster, connect_timeout, heartbeat_timeout, collective_timeout)
    if strategy == "one_device" or (strategy == "auto" and len(gpus) < 2):
        if strategy == "auto":
            return tf.distribute.get_strategy()
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    return tf.distribute.MirroredStrategy()


def check_addresses(cluster: Cluster) -> None:
    """Refuses the cluster mistakes TensorFlow would report late, or as a traceback.

    Before this task's gRPC server starts: every task's host must resolve (else each worker
    waits ``connect_timeout`` for a peer it can never reach), no two tasks may share one
    address (two node entries on one host with the same port), and this task's port must be
    free on this machine (else TensorFlow fails with "Could not start gRPC server").
    Each is one message naming the task, its host and port, and the setting that changes it.

    Raises:
      SegtrainError: an unresolvable host, two tasks at one address, or this task's port in use.
    """
    where = f"(from {cluster.source})"
    seen: dict[tuple[str, int], tuple[str, str]] = {}
    for kind, addrs in cluster.spec.items():
        for i, addr in enumerate(addrs):
            host, _, port = addr.rpartition(":")
            try:
                infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as e:
                raise SegtrainError(
                    f"Cluster {where}: the host of {kind} {i}, {host!r} in {addr}, does not resolve "
                    f"({getattr(e, 'strerror', None) or e}). {_host_fix(cluster.source)}"
                ) from None
            keys = {(info[4][0], int(port)) for info in infos}
            for key in sorted(keys & seen.keys()):
                other, other_addr = seen[key]
                raise SegtrainError(
                    f"Cluster {where}: {other} ({other_addr}) and {kind} {i} ({addr}) are the same address "
                    f"{key[0]}:{key[1]}, where only one task can listen. {_port_fix(cluster.source)}"
                )
            seen.update(dict.fromkeys(keys, (f"{kind} {i}", addr)))
    host, _, port = cluster.address.rpartition(":")
    me = f"{cluster.task_type} {cluster.task_id}"
    # TensorFlow's server listens on 0.0.0.0:port. SO_REUSEADDR as gRPC sets it: a previous
    # run's connections in TIME_WAIT do not block a relaunch, a live listener does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", int(port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SegtrainError(
                    f"{me} {where} cannot listen on {cluster.address}: port {port} is in use on this machine "
                    f"({socket.gethostname()}), by another job or process. {_port_fix(cluster.source)}"
                ) from None
            if e.errno == errno.EACCES:
                raise SegtrainError(
                    f"{me} {where} cannot listen on {cluster.address}: ports below 1024 need root. "
                    f"{_port_fix(cluster.source)}"
                ) from None
            raise SegtrainError(f"{me} {where} cannot listen on {cluster.address}: {e.strerror}.") from None


def _port_fix(source: str) -> str:
    if source == "SLURM":
        return ("Pick another first port with SEGTRAIN_PORT=P (launch/slurm.sbatch; in gin, distribute."
                "slurm_port_base): the tasks of one node listen on P, P+1, ...; two node entries on one "
                "host need distinct ports or addresses.")
    return ("Give every task its own free host:port in TF_CONFIG's cluster (launch/local.py picks free "
            "ports itself).")


def _host_fix(source: str) -> str:
    if source == "SLURM":
        return ("SLURM's node names must resolve on every node (DNS or /etc/hosts): check the step's "
                "SLURM_STEP_NODELIST and `getent hosts <name>`.")
    return "Use host names that resolve on every machine, or IP addresses, in TF_CONFIG's cluster."


def _multi_worker(cluster: Cluster, timeout: float, heartbeat_timeout: float,
                  collective_timeout: float | None) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy, with a bounded wait for the peers and a set heartbeat.

    The constructor blocks in native code until every task has joined, and nothing inside this
    process can interrupt it: a watchdog process (segtrain.train.watchdog) ends the task with a
    message naming the unreachable peers when the wait runs out.
    """
    check_addresses(cluster)
    _configure_coordination_service(cluster, heartbeat_timeout)
    info = {"task": f"{cluster.task_type} {cluster.task_id} ({cluster.address})", "source": cluster.source,
            "peers": cluster.peers()}
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "segtrain.train.watchdog", str(os.getpid()), str(timeout), json.dumps(info)],
        stdin=subprocess.DEVNULL,
    )
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster.resolver,
                                                         communication_options=options)
    except tf.errors.UnknownError as e:
        if "Could not start gRPC server" not in str(e):
            raise
        # The port was taken between check_addresses and the server's start.
        raise SegtrainError(
            f"{cluster.task_type} {cluster.task_id} (from {cluster.source}) could not start its gRPC server "
            f"on {cluster.address}: the port is in use. {_port_fix(cluster.source)}"
        ) from None
    finally:
        watchdog.kill()
        watchdog.wait()


def _configure_coordination_service(cluster: Cluster, heartbeat_timeout: float) -> None:
    """The coordination service MultiWorkerMirroredStrategy would start, with our heartbeat timeout.

    The strategy configures the service itself only when nothing configured it before, with
    TensorFlow's defaults; there is no public API for the timeout, so this sets the same service
    (hosted by the chief, every chief and worker task coordinated) through the eager context.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    leader = "chief" if "chief" in cluster.spec else "worker"
    jobs = [coordination_config_pb2.CoordinatedJob(name=kind, num_tasks=len(cluster.spec[kind]))
            for kind in ("chief", "worker") if kind in cluster.spec]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=f"/job:{leader}/replica:0/task:0", coordinated_jobs=jobs,
        heartbeat_timeout_in_ms=int(heartbeat_timeout * 1000),
    )


class LostPeer(SegtrainError):
    """A cluster peer stopped or became unreachable during training; the job must be relaunched.

    The process exits at once after the message: TensorFlow's teardown of a cluster with a
    lost task can wait for that task forever.
    """

    hard_exit = True


# Where TensorFlow's errors name a task: "/job:worker/replica:0/task:1" or "/job:worker/task:1".
_TASK = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")
_GRPC_MESSAGE = re.compile(r'grpc_message:"([^"]*)"')
# Error classes a lost peer causes (the collective's connection failed, was aborted or timed
# out) when the error also names a task or a collective: an UnavailableError of, say, a remote
# file system is no lost peer.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)
# What a lost peer's error says, whatever its class (an aborted collective can surface as a
# CancelledError or InternalError too).
_PEER_SIGNS = ("Collective ops is aborted", "stopped sending heartbeats", "CoordinationServiceError",
               "coordination service")


class lost_peers:  # noqa: N801 (used as a context manager, reads like a statement)
    """Turns the error a lost cluster peer causes into one LostPeer message that names it.

    Under MultiWorkerMirroredStrategy a worker that dies makes every other worker's next
    collective fail with a framework error (UnavailableError, usually) and a page of context.
    This says which task was lost, at which step, and where the relaunched job resumes. Other
    errors, and every error outside a multi-worker cluster, pass through unchanged.

    Args:
      strategy: the run's strategy.
      step: returns the current training step.
      last_checkpoint: returns the newest complete checkpoint in model_dir (the chief's), or None.
    """

    def __init__(self, strategy: tf.distribute.Strategy, step: Callable[[], int],
                 last_checkpoint: Callable[[], str | None]):
        self.strategy, self.step, self.last_checkpoint = strategy, step, last_checkpoint

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if exc is None or resolver is None or not getattr(resolver, "task_type", None):
            return False
        spec = resolver.cluster_spec().as_dict()
        if sum(len(v) for v in spec.values()) < 2:
            return False
        error = peer_error(exc)
        if error is None:
            return False
        raise LostPeer(lost_peer_message(error.message, spec, (resolver.task_type, int(resolver.task_id)),
                                         self._step(), self.last_checkpoint())) from None

    def _step(self) -> int | None:
        try:
            return int(self.step())
        except (tf.errors.OpError, ValueError, RuntimeError):
            return None


def peer_error(exc: BaseException) -> tf.errors.OpError | None:
    """The framework error of a lost peer behind ``exc`` (itself, or what a SegtrainError hides).

    A checkpoint save that fails on a lost peer, for example, becomes a SegtrainError about the
    save; the lost peer is the cause to report.
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, tf.errors.OpError):
            text = exc.message
            if any(sign in text for sign in _PEER_SIGNS) or (
                    isinstance(exc, _PEER_ERRORS) and (_TASK.search(text) or "Collective" in text)):
                return exc
        if not isinstance(exc, (tf.errors.OpError, SegtrainError)):
            return None
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def lost_peer_message(text: str, spec: dict, me: tuple[str, int], step: int | None,
                      checkpoint: str | None) -> str:
    """One message for a lost peer: who (from the tasks ``text`` names), when, why, what to do."""
    named = []
    for kind, index in _TASK.findall(text):
        task = (kind, int(index))
        if task != me and kind in spec and task[1] < len(spec[kind]) and task not in named:
            named.append(task)
    leader = ("chief", 0) if "chief" in spec else ("worker", 0)
    if not named and "CoordinationService/" in text and leader != me:  # an RPC to the service failed
        named.append(leader)

    def describe(task):
        kind, index = task
        role = (", the chief (it hosts the coordination service)"
                if chief_task(kind, index, spec) else "")
        return f"{kind} {index} ({spec[kind][index]}){role}"

    others = [(kind, i) for kind, addrs in spec.items() for i in range(len(addrs)) if (kind, i) != me]
    if named or len(others) == 1:
        who = "lost " + ", ".join(describe(t) for t in named or others)
    else:
        who = "lost contact with the cluster (one of " + ", ".join(describe(t) for t in others) + ")"
    when = f" at about step {step}" if step is not None else ""
    resume = (f"every worker resumes from the chief's last checkpoint {os.path.basename(checkpoint)}"
              if checkpoint else "no checkpoint was written yet, so it starts from step 0")
    return (f"{who}{when}: {_reason(text)}. A cluster cannot go on without one of its tasks, so "
            f"{me[0]} {me[1]} stops too; the lost task's own output says why it stopped. Relaunch the "
            f"job: {resume}.")


def _reason(text: str) -> str:
    """What a lost peer's framework error says happened, in a few words."""
    if "stopped sending heartbeats" in text:
        return "it stopped sending heartbeats (distribute.heartbeat_timeout)"
    if "CoordinationService/Heartbeat" in text:
        return "it stopped answering heartbeats (distribute.heartbeat_timeout)"
    grpc = _GRPC_MESSAGE.search(text)
    if grpc:
        return f"the connection to it failed ({grpc.group(1)})"
    if "Collective has timed out" in text:
        return "a collective timed out waiting for it (distribute.collective_timeout)"
    if "Deadline Exceeded" in text:
        return "it did not answer in time (Deadline Exceeded)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines
              if not line.startswith(("Graph execution error", "Detected at node", "<stack"))]
    return re.sub(r"\s*\[\[.*", "", useful[0] if useful else "unknown error")[:300]


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
    chief's files are kept; the others' are removed by ``cleanup``. A worker that was killed
    could not remove its directory (a checkpoint's worth of files each time): the next one
    removes the directories of tasks whose process no longer runs.
    """

    def __init__(self, model_dir: str, strategy: tf.distribute.Strategy):
        self.model_dir = model_dir
        self.chief = is_chief(strategy)
        if self.chief:
            self.path = model_dir
        else:
            _remove_orphans(tempfile.gettempdir())
            self.path = tempfile.mkdtemp(prefix=f"segtrain-{task_name(strategy)}-{os.getpid()}-")

    def cleanup(self) -> None:
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)


_SCRATCH = re.compile(r"segtrain-[a-z]+\d+-(\d+)-")


def _remove_orphans(directory: str) -> None:
    """Removes the scratch directories of workers on this machine whose process is gone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _SCRATCH.match(name)
        if not match or _running(int(match.group(1))):
            continue
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
