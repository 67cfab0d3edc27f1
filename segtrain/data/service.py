"""tf.data service: the training input made by other machines' CPUs.

``pipeline.data_service_address = 'grpc://host:port'`` sends the training pipeline, batched,
to a tf.data service dispatcher (`segtrain data-service`), whose workers run it and stream the
batches back. The input then scales with the number of service workers instead of the CPU
cores of the training host. Evaluation stays local.

Every training worker builds the same pipeline and reads one shared job in
``distributed_epoch`` mode: the dispatcher hands each part of the source (a range of example
indices, a file of records) to one service worker, so each example is processed once per
epoch and each batch goes to exactly one training worker. ``parallel_epochs`` would not do:
there every service worker runs the whole pipeline, and segtrain's is seeded (shuffling and
augmentation are fixed by the seed), so N service workers would deliver every batch N times.

The job's name holds the run (a hash of its model_dir), the global and per-replica batch sizes
and the seed, which a resumed run advances by its start step: a resumed or resized run opens
a new job instead of reading the position of a stale one.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

import tensorflow as tf

from segtrain import compat
from segtrain.errors import SegtrainError

FLAG = "pipeline.data_service_address"
# Ops that call back into the Python process that built the pipeline: a service worker, a
# different process, has no such Python function to call.
PYTHON_OPS = {
    "PyFunc": "tf.numpy_function",
    "PyFuncStateless": "tf.numpy_function",
    "EagerPyFunc": "tf.py_function",
    "GeneratorDataset": "Dataset.from_generator",
}
# How long a training job waits for the dispatcher to listen (launchers start both at once).
DISPATCHER_WAIT_S = 60.0


def python_functions(dataset: tf.data.Dataset) -> list[str]:
    """The Python-calling constructs (e.g. 'tf.numpy_function') in ``dataset``'s graph, nested
    functions included; empty when a service worker can run it."""
    # The graph the service itself would send to its workers (TensorFlow has no public API for it).
    graph = compat.serialized_graph(dataset)
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
    return sorted({PYTHON_OPS[op] for op in ops if op in PYTHON_OPS})


def split_address(address, flag: str = FLAG) -> tuple[str, str, int]:
    """'grpc://host:port' or 'host:port' (the value of ``flag``) -> (protocol, host, port).

    Raises:
      SegtrainError: not such an address.
    """
    text = address if isinstance(address, str) else ""
    protocol, _, rest = text.rpartition("://")
    host, _, port = rest.rpartition(":")
    if protocol not in ("", "grpc") or not host or not port.isdigit():
        raise SegtrainError(
            f"{flag}={address!r} is not a dispatcher address: use 'grpc://HOST:PORT', the address "
            f"`segtrain data-service --port=PORT` prints."
        )
    return protocol or "grpc", host.strip("[]"), int(port)


def wait_for_dispatcher(address: str, timeout: float | None = None, flag: str = FLAG) -> None:
    """Returns once something listens at ``address`` (the value of ``flag``).

    Without this a wrong address hangs the first step: TensorFlow retries it forever.

    Raises:
      SegtrainError: nothing listens there after ``timeout`` seconds (DISPATCHER_WAIT_S).
    """
    _, host, port = split_address(address, flag)
    timeout = DISPATCHER_WAIT_S if timeout is None else timeout
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(timeout, 0.1))):
                return
        except OSError as e:
            if time.monotonic() >= end:
                raise SegtrainError(
                    f"No tf.data service dispatcher answers at {flag}={address!r} ({e.strerror or e}) after "
                    f"{timeout:.0f} s: start one with `segtrain data-service --port={port}` (and workers with "
                    f"`segtrain data-service --port=P --dispatcher={host}:{port}`)"
                    + (f", or unset {FLAG} to read the data on this machine." if flag == FLAG else ".")
                ) from None
            time.sleep(0.5)


def job_name(dataset: str, split: str, global_batch: int, batch_size: int, seed: int,
             run: str | None = None) -> str:
    """The service job every training worker of one run (and start step) shares.

    Args:
      dataset, split: what is read.
      global_batch, batch_size: the global and the per-replica (per consumer) batch size.
      seed: the pipeline's seed (a resumed run's includes its start step).
      run: what tells this run apart from others sharing the dispatcher (its model_dir).
    """
    tag = hashlib.sha1(os.path.abspath(run).encode()).hexdigest()[:10] if run else "norun"
    return f"segtrain-{dataset}-{split}-{tag}-batch{global_batch}-replica{batch_size}-seed{seed}"


def distribute(dataset: tf.data.Dataset, address: str, job: str, what: str,
               timeout: float | None = None) -> tf.data.Dataset:
    """``dataset`` made by the tf.data service at ``address``, in job ``job`` (distributed_epoch).

    Args:
      dataset: the batched training pipeline.
      address: the dispatcher, 'grpc://host:port'.
      job: the shared job's name (see job_name).
      what: the dataset and split, for messages.
      timeout: seconds to wait for the dispatcher (default DISPATCHER_WAIT_S).

    Raises:
      SegtrainError: an address that is none, a pipeline that calls Python, no dispatcher.
    """
    split_address(address)
    calls = python_functions(dataset)
    if calls:
        raise SegtrainError(
            f"{FLAG}={address!r}: the pipeline of {what} calls Python ({', '.join(calls)}), which a tf.data "
            f"service worker cannot run. For a dataset read from its raw files, prepare it (`segtrain prepare`) "
            f"and set its data_dir; for a dataset plugin of your own, read it with TensorFlow ops; or unset "
            f"{FLAG} to read the data on this machine."
        )
    wait_for_dispatcher(address, timeout)
    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode="distributed_epoch", service=address if "://" in address else f"grpc://{address}",
        job_name=job))


def host_port(host: str, port: int | str) -> str:
    """'host:port', with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_dispatcher(port: int = 0) -> tuple[tf.data.experimental.service.DispatchServer, int]:
    """A running dispatcher on ``port`` (0: a free one), and its port."""
    server = tf.data.experimental.service.DispatchServer(tf.data.experimental.service.DispatcherConfig(port=port))
    return server, split_address(server.target)[2]


def start_worker(dispatcher: str, port: int = 0, host: str = "localhost", flag: str = FLAG,
                 heartbeat_ms: int = 1000) -> tuple[tf.data.experimental.service.WorkerServer, int]:
    """A running worker on ``port`` (0: a free one) registered with ``dispatcher``, and its port.

    Args:
      dispatcher: the dispatcher's 'host:port' (or 'grpc://host:port'), the value of ``flag``.
      port: the port the worker serves batches on.
      host: the name the training jobs reach this worker by; the dispatcher hands it to them.
      heartbeat_ms: how often the worker reports to the dispatcher. Stopping waits for the
        next report: with TensorFlow's default (30 s) a worker can outlive a SIGTERM's grace.

    Raises:
      SegtrainError: a bad dispatcher address, or no dispatcher there.
    """
    _, dispatcher_host, dispatcher_port = split_address(dispatcher, flag)
    wait_for_dispatcher(dispatcher, flag=flag)
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=host_port(dispatcher_host, dispatcher_port),
        worker_address=host_port(host, "%port%"),  # TensorFlow fills in the port it serves on
        port=port, heartbeat_interval_ms=heartbeat_ms)
    server = tf.data.experimental.service.WorkerServer(config)
    # With port 0 the worker picks one; only its private address says which.
    address = getattr(server, "_address", None)
    return server, int(address.rpartition(":")[2]) if address else port
