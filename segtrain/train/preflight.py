"""The checks of `segtrain doctor` that need the run's strategy: what a long job relies on.

Each check returns a ``Check`` row (name, status, detail) and never raises for what it finds:
`segtrain doctor` prints every row, so one failure does not hide the next. Checks that talk to
the other replicas (all-reduce, the training steps) run in the same order on every task, so a
cluster's collectives line up.

The training checks use the real ``Trainer`` on a tiny U-Net and a fixed random batch: the step,
the window-end averaging and the gradient all-reduce are the ones a job runs.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
import warnings

import gin
import keras
import numpy as np
import tensorflow as tf

import segtrain
from segtrain.errors import SegtrainError
from segtrain.precision import check_precision
from segtrain.train import replicas as replica_state

OK, FAIL, INFO, SKIP = "ok", "FAIL", "info", "skip"
SIZE, PER_REPLICA, STEPS = 32, 2, 3
# The tiny experiment the training checks build (gin bindings; the dataset only names classes).
TINY = ["train.model = 'unet'", "models.unet.depth = 2", "models.unet.base_filters = 4",
        "train.dataset = 'shapes'", "optimizer.name = 'sgd'", "learning_rate.base = 0.05",
        "train.steps_per_loop = 3", "train.precision = 'float32'", "train.xla = False"]
BANDWIDTH_MIB = 16


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str


def versions() -> Check:
    build = tf.sysconfig.get_build_info()
    cuda = (f"built for CUDA {build.get('cuda_version', '?')} and cuDNN {build.get('cudnn_version', '?')}"
            if build.get("is_cuda_build") else "a CPU build of TensorFlow (no CUDA)")
    return Check("versions", INFO, f"segtrain {segtrain.__version__}, TensorFlow {tf.__version__}, Keras "
                                   f"{keras.__version__}, Python {platform.python_version()}; {cuda}")


def devices(strategy: tf.distribute.Strategy) -> Check:
    """The devices this task sees, and the replicas it runs."""
    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        capability = details.get("compute_capability")
        names.append(f"{details.get('device_name', gpu.name)}"
                     + (f" (compute {capability[0]}.{capability[1]})" if capability else ""))
    cpus = len(tf.config.list_logical_devices("CPU"))
    local = replica_state.local_replicas(strategy)
    seen = (f"{len(gpus)} GPU(s): {', '.join(names)}" if gpus else "no GPU") + f"; {cpus} CPU device(s)"
    detail = f"{seen}; {local} replica(s) here, {strategy.num_replicas_in_sync} in all"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not gpus and visible not in (None, "", "-1"):
        return Check("devices", FAIL, f"{detail}. CUDA_VISIBLE_DEVICES={visible} names GPUs, but TensorFlow sees "
                                      f"none: install a CUDA build of TensorFlow (pip install 'tensorflow[and-cuda]') "
                                      f"or check the driver (nvidia-smi).")
    return Check("devices", OK, detail)


def precision(name: str) -> Check:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check_precision(name)
        except SegtrainError as e:
            return Check("precision", FAIL, str(e))
    if caught:
        return Check("precision", OK, f"{name}; warning: {caught[0].message}")
    return Check("precision", OK, name)


def all_reduce(strategy: tf.distribute.Strategy) -> Check:
    """A SUM all-reduce gives the right number on every replica; its bandwidth on BANDWIDTH_MIB."""
    n = strategy.num_replicas_in_sync
    if n < 2:
        return Check("all-reduce", SKIP, "one replica: nothing to reduce")

    def summed():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return tf.distribute.get_replica_context().all_reduce("SUM", tf.cast(replica + 1, tf.float32))

    got = {float(x) for x in strategy.experimental_local_results(tf.function(lambda: strategy.run(summed))())}
    want = n * (n + 1) / 2
    if got != {want}:
        return Check("all-reduce", FAIL, f"the sum of 1..{n} over the replicas came back as {sorted(got)}, not {want}")
    size = BANDWIDTH_MIB * 2**20 // 4
    with strategy.scope():
        payload = tf.Variable(tf.ones([size]), trainable=False, name="doctor_payload")

    @tf.function
    def reduce_payload():
        return strategy.run(lambda: tf.reduce_sum(tf.distribute.get_replica_context().all_reduce("SUM", tf.identity(payload))))

    reduce_payload()  # traces, and warms the links up
    rounds, t0 = 5, time.perf_counter()
    for _ in range(rounds):
        result = reduce_payload()
    float(strategy.experimental_local_results(result)[0])
    seconds = (time.perf_counter() - t0) / rounds
    algorithm = BANDWIDTH_MIB * 2**20 / seconds / 1e9
    bus = algorithm * 2 * (n - 1) / n  # what each link carries in a ring all-reduce
    return Check("all-reduce", OK, f"SUM over {n} replicas correct; {BANDWIDTH_MIB} MiB in {seconds * 1000:.1f} ms: "
                                   f"{algorithm:.2f} GB/s algorithm, {bus:.2f} GB/s bus bandwidth")


def _batches(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = n * PER_REPLICA
    return {"image": rng.normal(size=(size, SIZE, SIZE, 3)).astype(np.float32),
            "label": rng.integers(0, 4, size=(size, SIZE, SIZE)).astype(np.int32)}


def _trainer(strategy, scratch: str, batch_size: int, *bindings: str):
    from segtrain import config
    from segtrain.experiment import Experiment, ExperimentConfig
    from segtrain.train.trainer import Trainer  # registers train.*, optimizer.*, ... for the bindings

    gin.clear_config()
    config.parse([], [*TINY, f"train.batch_size = {batch_size}", *bindings])
    config = ExperimentConfig()
    return Trainer(Experiment(config, strategy, split=config.train_split), tempfile.mkdtemp(dir=scratch))


def _distributed(strategy, batch: dict):
    """The global ``batch`` as the strategy's per-replica batches: replica r gets its slice."""
    def dataset_fn(context):
        per_worker = context.num_replicas_in_sync // context.num_input_pipelines
        first = context.input_pipeline_id * per_worker * PER_REPLICA
        mine = {k: v[first: first + per_worker * PER_REPLICA] for k, v in batch.items()}
        return tf.data.Dataset.from_tensor_slices(mine).batch(PER_REPLICA).repeat()

    return iter(strategy.distribute_datasets_from_function(dataset_fn))


def training(strategy: tf.distribute.Strategy, scratch: str) -> list[Check]:
    """Three steps of a tiny U-Net: N replicas against one (synchronised batch norm, so the
    batch statistics are the global batch's in both), and the copies after a window with
    each replica's own batch norm."""
    n = strategy.num_replicas_in_sync
    batch = _batches(n)
    size = n * PER_REPLICA
    rows = []
    if n > 1:
        many = _trainer(strategy, scratch, size, "train.synchronized_batch_norm = True")
        one = _trainer(tf.distribute.get_strategy(), scratch, size, "train.synchronized_batch_norm = True")
        one.model.set_weights(many.model.get_weights())
        start = [w.copy() for w in many.model.get_weights()]
        got = many.train_window(_distributed(strategy, batch), 0, STEPS, first=True)
        want = one.train_window(iter(tf.data.Dataset.from_tensors(batch).repeat()), 0, STEPS, first=True)
        rows.append(_compare(n, got.losses, want.losses, many.model.get_weights(), one.model.get_weights(), start))
    else:
        rows.append(Check("1 vs N replicas", SKIP, "one replica"))
    trainer = _trainer(strategy, scratch, size)
    trainer.decorrelate_replicas()
    trainer.train_window(_distributed(strategy, batch), 0, STEPS, first=True)
    rows.append(_agreement(strategy, trainer))
    gin.clear_config()
    return rows


def _compare(n, losses, reference_losses, weights, reference, start) -> Check:
    moved = np.sqrt(sum(float(np.sum((r - s) ** 2)) for r, s in zip(reference, start)))
    apart = np.sqrt(sum(float(np.sum((w - r) ** 2)) for w, r in zip(weights, reference)))
    loss_gap = float(np.max(np.abs(np.asarray(losses) - np.asarray(reference_losses))))
    detail = (f"after {STEPS} steps: losses {', '.join(f'{x:.5f}' for x in losses)} (1 replica: "
              f"{', '.join(f'{x:.5f}' for x in reference_losses)}); weights {apart:.2e} apart, "
              f"{apart / moved if moved else 0:.1e} of how far they moved")
    # Float summation order alone: well under a percent of the update (TF32 on Ampere included).
    if not (np.all(np.isfinite(losses)) and loss_gap <= 1e-3 * max(1.0, abs(reference_losses[0]))
            and apart <= 1e-2 * moved + 1e-6):
        return Check("1 vs N replicas", FAIL, f"{n} replicas and 1 train differently: {detail}")
    return Check("1 vs N replicas", OK, f"{n} replicas train as 1: {detail}")


def _agreement(strategy, trainer) -> Check:
    """Every local copy equal, and every task's fingerprint the same (gathered over replicas)."""
    variables = trainer.state_variables()
    local = replica_state.disagreements(strategy, variables)
    digest = replica_state.fingerprint(strategy, variables)
    chunks = np.frombuffer(bytes.fromhex(digest), np.uint16).astype(np.float32)  # 16-bit pieces: exact in float32

    def gather():
        return tf.distribute.get_replica_context().all_gather(tf.constant(chunks)[None], axis=0)

    gathered = np.asarray(strategy.experimental_local_results(tf.function(lambda: strategy.run(gather))())[0])
    tasks = len({row.tobytes() for row in gathered})
    where = f"{strategy.num_replicas_in_sync} replica(s)"
    if local:
        return Check("replicas agree", FAIL, f"local copies differ after a window: {', '.join(local[:5])}")
    if tasks > 1:
        return Check("replicas agree", FAIL, f"the tasks hold different state after a window ({tasks} different "
                                             f"fingerprints over {where}; this task's is {digest})")
    return Check("replicas agree", OK, f"every copy of {len(variables)} variables equal over {where} after a "
                                       f"window (sha256 {digest})")
