"""Strategies and clusters: which tf.distribute strategy a run uses, and which worker is chief.

    auto          MultiWorkerMirroredStrategy when TF_CONFIG or a SLURM step describes several
                  tasks; else MirroredStrategy over all GPUs when there are 2 or more (or over
                  ``cpu_replicas`` logical CPU devices); else the default strategy.
    one_device    one device: the first GPU, else the CPU.
    mirrored      MirroredStrategy over all local GPUs, or ``cpu_replicas`` CPU devices.
    multi_worker  MultiWorkerMirroredStrategy; the cluster comes from TF_CONFIG or SLURM.

The cluster engine is tf.distribute's own (collective all-reduce over gRPC). Where the cluster
comes from, and what is wrong with it, is segtrain.runtime.cluster's; this module bounds the wait
for peers, sets how soon a lost peer is noticed, and turns the error a lost peer causes into one
message (``lost_peers``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable

import gin
import tensorflow as tf

from segtrain import compat
from segtrain.errors import SegtrainError
from segtrain.io import remove_orphan_tempdirs
from segtrain.runtime.cluster import (PORT_LAYOUTS, Cluster, check_addresses, chief_task, detect_cluster,
                                    pin_slurm_task_gpus, port_fix)

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")


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


def visible_gpus() -> list:
    """The GPUs TensorFlow sees (lists them, so after any CUDA_VISIBLE_DEVICES pinning)."""
    return tf.config.list_physical_devices("GPU")


@gin.configurable("distribute")
def build_strategy(
    strategy: str = "auto",
    cpu_replicas: int = 0,
    connect_timeout: float = 300.0,
    slurm_gpus_per_node: int | None = None,
    slurm_port_base: int = 8888,
    slurm_ports: str = "node",
    num_workers: int | None = None,
    heartbeat_timeout: float = 20.0,
    collective_timeout: float | None = None,
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
      slurm_gpus_per_node: GPUs per node of a SLURM job (default: those visible here). With
        several tasks per node (one per GPU), each task takes its share of them
        (segtrain.runtime.cluster.slurm_task_gpus).
      slurm_port_base: the first port of the SLURM tasks' gRPC servers.
      slurm_ports: 'node': a node's tasks listen on slurm_port_base, +1, ...; 'job': task r of
        the job on slurm_port_base + r (node entries that share one host).
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
    if slurm_ports not in PORT_LAYOUTS:
        raise SegtrainError(f"distribute.slurm_ports={slurm_ports!r}: use one of {', '.join(PORT_LAYOUTS)}.")
    if strategy in ("auto", "multi_worker"):
        pin_slurm_task_gpus(slurm_gpus_per_node)  # before TensorFlow first lists the GPUs
    gpus = visible_gpus()
    cluster = (detect_cluster(slurm_gpus_per_node, slurm_port_base, num_workers, slurm_ports)
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


def _multi_worker(cluster: Cluster, timeout: float, heartbeat_timeout: float,
                  collective_timeout: float | None) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy, with a bounded wait for the peers and a set heartbeat.

    The constructor blocks in native code until every task has joined, and nothing inside this
    process can interrupt it: a watchdog process (segtrain.runtime.watchdog) ends the task with a
    message naming the unreachable peers when the wait runs out.
    """
    check_addresses(cluster)
    _configure_coordination_service(cluster, heartbeat_timeout)
    info = {"task": f"{cluster.task_type} {cluster.task_id} ({cluster.address})", "source": cluster.source,
            "peers": cluster.peers()}
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "segtrain.runtime.watchdog", str(os.getpid()), str(timeout), json.dumps(info)],
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
            f"on {cluster.address}: the port is in use. {port_fix(cluster.source)}"
        ) from None
    finally:
        watchdog.kill()
        watchdog.wait()


def _configure_coordination_service(cluster: Cluster, heartbeat_timeout: float) -> None:
    """The coordination service MultiWorkerMirroredStrategy would start, with our heartbeat timeout.

    The strategy configures the service itself only when nothing configured it before, with
    TensorFlow's defaults; there is no public API for the timeout, so this sets the same service
    (hosted by the chief, every chief and worker task coordinated): segtrain.compat.
    """
    leader = "chief" if "chief" in cluster.spec else "worker"
    jobs = {kind: len(cluster.spec[kind]) for kind in ("chief", "worker") if kind in cluster.spec}
    compat.configure_coordination_service(f"/job:{leader}/replica:0/task:0", jobs, int(heartbeat_timeout * 1000))


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
            remove_orphan_tempdirs(tempfile.gettempdir(), _SCRATCH)  # of workers killed before
            self.path = tempfile.mkdtemp(prefix=f"segtrain-{task_name(strategy)}-{os.getpid()}-")

    def cleanup(self) -> None:
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)


# A worker's scratch directory: segtrain-<task>-<pid>-<random>.
_SCRATCH = r"segtrain-[a-z]+\d+-(\d+)-"
