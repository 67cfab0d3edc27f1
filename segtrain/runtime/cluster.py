"""Clusters: where each task of a multi-worker job stands, from whichever launcher started it.

One module for every launcher, with one set of messages:

    launch/local.py     writes a TF_CONFIG per worker (``local_tf_configs``), on 127.0.0.1
    Kubernetes (TFJob)  the training operator writes each pod's TF_CONFIG
    launch/slurm.sbatch the SLURM_* variables of the job step (``cluster_from_slurm``)

``detect_cluster`` reads TF_CONFIG first, then SLURM, and refuses the two when both describe a
cluster and disagree. ``check_addresses`` refuses unresolvable hosts, shared addresses and a
port in use before any gRPC server starts. ``slurm_task_gpus`` gives each task of a
one-task-per-GPU SLURM step its own GPUs.

Nothing here imports TensorFlow at module level: launch/local.py uses it before any worker
starts, and ``slurm_task_gpus`` must run before TensorFlow looks at the GPUs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Mapping

from segtrain.errors import SegtrainError

PORT_LAYOUTS = ("node", "job")


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
    resolver: object = None

    @property
    def num_tasks(self) -> int:
        return sum(len(v) for v in self.spec.values())

    @property
    def address(self) -> str:
        return self.spec[self.task_type][self.task_id]

    @property
    def rank(self) -> int:
        """This task's place in the cluster, the chief first: what SLURM calls SLURM_PROCID."""
        kinds = [kind for kind in ("chief", "worker") if kind in self.spec]
        before = sum(len(self.spec[kind]) for kind in kinds[:kinds.index(self.task_type)])
        return before + self.task_id

    @property
    def is_chief(self) -> bool:
        """The task that writes: the chief, else worker 0 when the cluster has no chief."""
        return chief_task(self.task_type, self.task_id, self.spec)

    def peers(self) -> list[tuple[str, str]]:
        """[(name, "host:port")] of every other task."""
        return [(f"{kind} {i}", addr) for kind, addrs in self.spec.items() for i, addr in enumerate(addrs)
                if (kind, i) != (self.task_type, self.task_id)]


def chief_task(task_type: str, task_id: int, spec: dict) -> bool:
    """The one rule of who writes: the 'chief' task, else worker 0 of a cluster without a chief."""
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in spec


# --- launch/local.py -------------------------------------------------------------------------

def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free now (held open together while picked)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_tf_configs(num_workers: int, host: str = "127.0.0.1") -> list[str]:
    """One TF_CONFIG per worker of a cluster of ``num_workers`` workers on ``host``, free ports."""
    workers = [f"{host}:{port}" for port in free_ports(num_workers, host)]
    return [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
            for i in range(num_workers)]


# --- TF_CONFIG (launch/local.py, Kubernetes) ----------------------------------------------------

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
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return Cluster(spec, kind, index, "TF_CONFIG", resolver)


def _is_address(value) -> bool:
    if not isinstance(value, str) or ":" not in value:
        return False
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


# --- SLURM (launch/slurm.sbatch) -------------------------------------------------------------

def tasks_per_node(value: str) -> list[int]:
    """SLURM's compressed task counts, "2(x3),1" -> [2, 2, 2, 1].

    Raises:
      SegtrainError: a value SLURM does not write.
    """
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise SegtrainError(f"SLURM_STEP_TASKS_PER_NODE={value!r}: expected counts like '2(x3),1'.")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def in_slurm_step(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ


def slurm_task_gpus(environ: Mapping[str, str] | None = None, gpus_per_node: int | None = None) -> str | None:
    """The CUDA_VISIBLE_DEVICES this task of a one-task-per-GPU SLURM step should have, or None.

    With several tasks on a node (``sbatch --ntasks-per-node=G``), each task takes its share of
    the node's GPUs by SLURM_LOCALID: G tasks over G GPUs one each, 2 tasks over 8 GPUs four
    each. The node's GPUs are CUDA_VISIBLE_DEVICES as SLURM set it for the step, else
    ``gpus_per_node`` (0..G-1). None: nothing to change (one task on the node, no GPUs known, or
    SLURM already gave each task its own, e.g. with --gpus-per-task).

    Raises:
      SegtrainError: the node's tasks cannot share its GPUs evenly (every worker of a cluster
        must drive as many GPUs as the others).
    """
    environ = os.environ if environ is None else environ
    if not in_slurm_step(environ):
        return None
    counts = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", "1"))
    node = int(environ.get("SLURM_NODEID", "0"))
    local = counts[node] if node < len(counts) else counts[0]
    if local < 2:
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip()]
    else:
        devices = [str(i) for i in range(gpus_per_node or 0)]
    if not devices:
        return None
    layout = (f"{local} tasks on node {environ.get('SLURMD_NODENAME', node)} (SLURM_STEP_TASKS_PER_NODE="
              f"{environ.get('SLURM_STEP_TASKS_PER_NODE')})")
    if len(devices) < local and gpus_per_node and gpus_per_node == local * len(devices):
        return None  # SLURM bound each task to its own GPUs already
    if len(devices) % local:
        where = (f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None
                 else f"distribute.slurm_gpus_per_node={gpus_per_node}")
        raise SegtrainError(
            f"{layout} cannot share {len(devices)} GPU(s) ({where}) evenly, and every worker must drive "
            f"as many GPUs as the others: ask sbatch for --ntasks-per-node equal to the GPUs per node "
            f"(one task per GPU) or 1 (one task driving all of them), with --gres=gpu:G."
        )
    share = len(devices) // local
    index = int(environ.get("SLURM_LOCALID", "0"))
    return ",".join(devices[index * share:(index + 1) * share])


def pin_slurm_task_gpus(gpus_per_node: int | None = None) -> str | None:
    """Sets CUDA_VISIBLE_DEVICES to this task's GPUs in a one-task-per-GPU SLURM step.

    Must run before TensorFlow first lists the GPUs (CUDA reads the variable then). Returns the
    value set, or None when nothing changed (see ``slurm_task_gpus``).
    """
    gpus = slurm_task_gpus(os.environ, gpus_per_node)
    if gpus is None or os.environ.get("CUDA_VISIBLE_DEVICES") == gpus:
        return None
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    print(f"segtrain: SLURM task {os.environ.get('SLURM_PROCID')} (local task {os.environ.get('SLURM_LOCALID', 0)} "
          f"of its node) uses GPU(s) {gpus}", file=sys.stderr, flush=True)
    return gpus


def cluster_from_slurm(gpus_per_node: int | None = None, port_base: int = 8888,
                       ports: str = "node") -> Cluster | None:
    """The cluster of the SLURM job step this process runs in, or None outside SLURM.

    Tasks are ranked by SLURM_PROCID, the first is the chief. Either one task per node drives all
    the node's GPUs, or each of several tasks per node drives its share (``slurm_task_gpus``).

    Args:
      gpus_per_node: GPUs each node has, shared evenly by its tasks (default: those this task
        sees, times the tasks per node).
      port_base: the first port of the tasks' gRPC servers.
      ports: 'node': the tasks of a node listen on port_base, port_base + 1, ... (as
        tf.distribute's SlurmClusterResolver does); 'job': task r listens on port_base + r, so
        that no two tasks of the job share a port, even when two node entries are one host.

    Raises:
      SegtrainError: the SLURM variables are incomplete or inconsistent, or the nodes' tasks
        cannot drive the same number of GPUs each.
    """
    if not in_slurm_step():
        return None
    if ports not in PORT_LAYOUTS:
        raise SegtrainError(f"distribute.slurm_ports={ports!r}: use one of {', '.join(PORT_LAYOUTS)}.")
    import tensorflow as tf

    counts = tasks_per_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1"))
    most = max(counts)
    if gpus_per_node is None:  # what this task sees: its share of the node (slurm_task_gpus)
        gpus_per_task = len(tf.config.list_physical_devices("GPU"))
        gpus_per_node = gpus_per_task * most
    else:
        gpus_per_task = gpus_per_node // most
    if gpus_per_node and len(set(counts)) > 1:
        raise SegtrainError(
            f"The SLURM step has {os.environ.get('SLURM_STEP_NUM_TASKS')} tasks placed "
            f"{os.environ.get('SLURM_STEP_TASKS_PER_NODE')} over its nodes "
            f"(SLURM_STEP_TASKS_PER_NODE), so its workers would drive different numbers of GPUs, which "
            f"MultiWorkerMirroredStrategy cannot combine: give every node the same number of tasks "
            f"(sbatch --ntasks-per-node=N, not --ntasks alone)."
        )
    try:
        # SlurmClusterResolver assigns GPUs to tasks; on CPU nodes it gets one placeholder per
        # task (auto_set_gpu is off, so it changes nothing) and the strategy is told the truth.
        per_node = max(gpus_per_node, most)
        slurm = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=port_base, gpus_per_node=per_node, gpus_per_task=per_node // most, auto_set_gpu=False
        )
        spec = slurm.cluster_spec().as_dict()
    except (RuntimeError, ValueError, KeyError) as e:
        raise SegtrainError(f"Could not resolve the SLURM cluster from the SLURM_* variables: {e}") from None
    if ports == "job":
        spec = {kind: [f"{addr.rpartition(':')[0]}:{port_base + rank}" for rank, addr in enumerate(addrs)]
                for kind, addrs in spec.items()}
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(spec), task_type=slurm.task_type, task_id=slurm.task_id, rpc_layer="grpc",
        num_accelerators={"GPU": gpus_per_task} if gpus_per_task else None,
    )
    return Cluster(spec, slurm.task_type, int(slurm.task_id), "SLURM", resolver)


# --- Which one ---------------------------------------------------------------------------------

def detect_cluster(slurm_gpus_per_node: int | None = None, slurm_port_base: int = 8888,
                   num_workers: int | None = None, slurm_ports: str = "node") -> Cluster | None:
    """A cluster of two or more tasks from TF_CONFIG or SLURM, else None.

    TF_CONFIG wins when both are present and agree (the same number of tasks, this task at the
    same rank); when they disagree the workers could form different clusters, so that is
    refused.

    Args:
      num_workers: the number of tasks the cluster must have (None: any).

    Raises:
      SegtrainError: a bad cluster description, TF_CONFIG and a SLURM step of several tasks
        that disagree, or a cluster of another size than ``num_workers``.
    """
    cluster = cluster_from_tf_config()
    if cluster is None:
        cluster = cluster_from_slurm(slurm_gpus_per_node, slurm_port_base, slurm_ports)
    elif in_slurm_step() and int(os.environ["SLURM_STEP_NUM_TASKS"]) > 1:
        _check_agree(cluster)
    if num_workers is not None:
        _check_size(cluster, num_workers)
    return cluster if cluster is not None and cluster.num_tasks > 1 else None


def _check_agree(tf_config: Cluster) -> None:
    """Refuses TF_CONFIG inside a SLURM step of several tasks when the two describe different clusters."""
    tasks, procid = int(os.environ["SLURM_STEP_NUM_TASKS"]), int(os.environ["SLURM_PROCID"])
    if tf_config.num_tasks == tasks and tf_config.rank == procid:
        return
    raise SegtrainError(
        f"TF_CONFIG and the SLURM step describe different clusters: TF_CONFIG has {tf_config.num_tasks} "
        f"task(s) and makes this {tf_config.task_type} {tf_config.task_id} (rank {tf_config.rank}), the "
        f"SLURM step has {tasks} task(s) and makes this SLURM_PROCID={procid}. TF_CONFIG wins when both "
        f"are set, so its workers would not be SLURM's: unset TF_CONFIG in the job script (`unset "
        f"TF_CONFIG` before srun) to train on the SLURM step, or start the workers without srun to train "
        f"on TF_CONFIG."
    )


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
            + f"): ask sbatch for --nodes and --ntasks-per-node whose product is {num_workers} "
            f"(launch/slurm.sbatch starts every task the job has), or set distribute.num_workers = "
            f"{found} (launch/slurm.sbatch: NUM_WORKERS={found})."
        )
    counts = ", ".join(f"{kind}: {len(addrs)}" for kind, addrs in cluster.spec.items())
    raise SegtrainError(
        f"{asked}, but TF_CONFIG describes {found} task(s) ({counts}): give TF_CONFIG's cluster "
        f"{num_workers} addresses (launch/local.py --num_workers={num_workers}), or set "
        f"distribute.num_workers = {found}."
    )


# --- Addresses -------------------------------------------------------------------------------

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
                    f"({getattr(e, 'strerror', None) or e}). {host_fix(cluster.source)}"
                ) from None
            keys = {(info[4][0], int(port)) for info in infos}
            for key in sorted(keys & seen.keys()):
                other, other_addr = seen[key]
                raise SegtrainError(
                    f"Cluster {where}: {other} ({other_addr}) and {kind} {i} ({addr}) are the same address "
                    f"{key[0]}:{key[1]}, where only one task can listen. {port_fix(cluster.source)}"
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
                    f"({socket.gethostname()}), by another job or process. {port_fix(cluster.source)}"
                ) from None
            if e.errno == errno.EACCES:
                raise SegtrainError(
                    f"{me} {where} cannot listen on {cluster.address}: ports below 1024 need root. "
                    f"{port_fix(cluster.source)}"
                ) from None
            raise SegtrainError(f"{me} {where} cannot listen on {cluster.address}: {e.strerror}.") from None


def port_fix(source: str) -> str:
    """What changes a task's port, for each source of clusters."""
    if source == "SLURM":
        return ("Pick another first port with SEGTRAIN_PORT=P (launch/slurm.sbatch; in gin, distribute."
                "slurm_port_base): the tasks of one node listen on P, P+1, ...; node entries that are one "
                "host need SEGTRAIN_PORTS=job (distribute.slurm_ports = 'job'), which gives every task of "
                "the job its own port.")
    return ("Give every task its own free host:port in TF_CONFIG's cluster (launch/local.py picks free "
            "ports itself).")


def host_fix(source: str) -> str:
    """What makes a task's host resolve, for each source of clusters."""
    if source == "SLURM":
        return ("SLURM's node names must resolve on every node (DNS or /etc/hosts): check the step's "
                "SLURM_STEP_NODELIST and `getent hosts <name>`.")
    return "Use host names that resolve on every machine, or IP addresses, in TF_CONFIG's cluster."
