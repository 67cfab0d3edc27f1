"""Replicas that agree: the per-replica state of a model under tf.distribute, and keeping it so.

Under a strategy every variable has one copy per replica (``strategy.experimental_local_results``).
Trainable weights, optimizer slots and step counters stay equal by construction: every replica
applies the same all-reduced gradient. Three kinds of state do not:

- **State a layer updates itself** in training, such as batch norm's moving mean and variance.
  Keras 3 creates them with aggregation NONE, and TensorFlow then updates only the local copy of
  such a variable in replica context (tf.keras 2 made them ON_READ + MEAN). Each replica's copy
  follows its own share of the data. ``drifting_variables`` finds this state and
  ``average_over_replicas`` replaces every copy by the mean over replicas, once per window, in
  one batched all-reduce. The moving average is linear, so the mean of the replicas' averages
  is what a cross-replica mean at every step (ON_READ + MEAN) would have given.
- **Random-number state** of layers (Keras ``SeedGenerator``: dropout, noise). Every copy starts
  equal, so every replica would draw the same dropout mask. It must differ: ``decorrelate_seeds``
  offsets each replica's seed by its replica id (replica 0 keeps the checkpointed one).
- **A float16 step whose gradients overflow on some replicas only.** Keras 3's
  LossScaleOptimizer decides per replica (or takes replica 0's decision for all), so one
  replica's overflow would reach the weights through the all-reduce. ``finite_everywhere``
  makes the decision one for all replicas, with one scalar all-reduce per step.

``local_copies``, ``disagreements`` and ``fingerprint`` look at every copy, not at the one
``v.numpy()`` shows (replica 0's).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from segtrain.errors import SegtrainError, warn
from segtrain.models.model import leaf_layers

# Replica r's seed is the checkpointed seed plus r times this (an odd constant far from the
# seeds of neighbouring generators).
SEED_STRIDE = 0x9E3779B1


def _tf(variable):
    """The TensorFlow variable behind a Keras variable (a distributed one under a strategy)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def drifting_variables(model: keras.Model) -> list:
    """The model's variables that each replica updates on its own: the non-trainable float
    weights of trainable layers (batch norm's moving statistics, and any such state of a plugin
    layer). Frozen layers' weights never change, so they are left out (a frozen backbone would
    otherwise cost an all-reduce of its every weight)."""
    found, seen = [], set()
    for layer in leaf_layers(model):
        if not layer.trainable:
            continue
        for variable in layer.non_trainable_weights:
            if id(variable) not in seen and tf.as_dtype(variable.dtype).is_floating:
                seen.add(id(variable))
                found.append(variable)
    return found


def seed_states(model: keras.Model) -> list:
    """The model's random-number states (Keras SeedGenerator variables: dropout and noise
    layers): variables that are not weights. Each replica must draw its own numbers."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights and tf.as_dtype(v.dtype).is_integer]


def average_over_replicas(variables: Sequence) -> None:
    """In replica context: sets every replica's copy of each variable to the mean over replicas.

    One all-reduce for the whole list; every replica receives the same result, so the copies are
    bit-identical afterwards.
    """
    if not variables:
        return
    context = tf.distribute.get_replica_context()
    # In float64: the mean of equal float32 copies is then exactly that value for any number of
    # replicas (state that did not move stays bit for bit), and of unequal ones the correctly
    # rounded mean. The cast is also a tensor on this replica's device, which an all-reduce under
    # MultiWorkerMirroredStrategy needs (a variable read may carry none).
    means = context.all_reduce("MEAN", [tf.cast(_tf(v), tf.float64) for v in variables])
    for variable, mean in zip(variables, means):
        variable.assign(tf.cast(mean, variable.dtype))


def decorrelate_seeds(states: Sequence) -> None:
    """In replica context: replica r draws from seed + r * SEED_STRIDE (replica 0 unchanged).

    Call it once after the states were restored or created (all copies then hold the same value).
    """
    if not states:
        return
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    for state in states:
        value = tf.convert_to_tensor(_tf(state))
        offset = tf.cast(replica, value.dtype) * tf.constant(SEED_STRIDE, value.dtype)
        state.assign(value + tf.concat([[offset], tf.zeros(tf.shape(value)[0] - 1, value.dtype)], 0))


def finite_everywhere(grads: Sequence) -> list:
    """In replica context: ``grads``, or all NaN on every replica when any replica's gradient is
    not finite, so that a loss-scaling optimizer skips the step (and lowers the scale) on all of
    them alike. One scalar all-reduce."""
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    local_bad = tf.logical_not(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in present]))
    bad = tf.distribute.get_replica_context().all_reduce("SUM", tf.cast(local_bad, tf.float32)) > 0
    return [None if g is None else g * tf.cast(tf.where(bad, np.nan, 1.0), g.dtype) for g in grads]


def local_copies(strategy: tf.distribute.Strategy, variable) -> list[np.ndarray]:
    """Every copy of ``variable`` this process holds, one per local replica."""
    return [np.asarray(copy.numpy()) for copy in strategy.experimental_local_results(_tf(variable))]


def disagreements(strategy: tf.distribute.Strategy, variables: Iterable) -> list[str]:
    """The names of the variables whose local copies are not bit-identical."""
    names = []
    for variable in variables:
        copies = local_copies(strategy, variable)
        if any(c.shape != copies[0].shape or c.tobytes() != copies[0].tobytes() for c in copies[1:]):
            names.append(getattr(variable, "path", None) or variable.name.split(":")[0])
    return names


def fingerprint(strategy: tf.distribute.Strategy, variables: Iterable) -> str:
    """A short SHA-256 of every local copy of every variable: processes holding the same state
    in the same number of replicas print the same one, and a replica that drifted changes it."""
    digest = hashlib.sha256()
    for variable in variables:
        for copy in local_copies(strategy, variable):
            digest.update(copy.tobytes())
    return digest.hexdigest()[:16]


def local_replicas(strategy: tf.distribute.Strategy) -> int:
    """The replicas this process runs (the default strategy: 1)."""
    try:
        return len(strategy.extended.worker_devices)
    except (RuntimeError, AttributeError):
        return 1


def report_agreement(strategy: tf.distribute.Strategy, variables: Sequence, task: str, step: int) -> None:
    """Prints a fingerprint of every local copy of ``variables`` (``<task>: step N, weights sha256
    ... (k replicas)``), for a cluster's task or a run over several replicas, so that the tasks of
    a job can be seen to agree; warns with their names when local copies differ."""
    if task == "local" and strategy.num_replicas_in_sync == 1:
        return
    local = local_replicas(strategy)
    differ = disagreements(strategy, variables) if local > 1 else []
    if differ:
        warn(f"the {local} local replicas hold different values of {len(differ)} variable(s) at step {step} "
             f"({', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}): a replica drifted. Please report "
             f"this with the model and the configuration (operative_config.gin).")
    copies = f"{local} local replicas" if local > 1 else "1 replica"
    print(f"{task}: step {step}, weights sha256 {fingerprint(strategy, variables)} ({copies})")


def check_synchronized_xla(xla: bool, synchronized: bool, strategy: tf.distribute.Strategy) -> None:
    """Synchronised batch norm all-reduces inside the XLA-compiled pass. MirroredStrategy does
    that only when every replica is a GPU; over CPU devices it would fail at the first step.

    Raises:
      SegtrainError: train.synchronized_batch_norm with --xla on CPU replicas of one machine.
    """
    if not (xla and synchronized) or strategy.num_replicas_in_sync < 2:
        return
    if not isinstance(strategy, tf.distribute.MirroredStrategy):
        return
    cpus = [d for d in strategy.extended.worker_devices if "GPU" not in d.upper()]
    if cpus:
        raise SegtrainError(
            f"train.synchronized_batch_norm with --xla (train.xla) needs GPU replicas: MirroredStrategy cannot "
            f"all-reduce inside an XLA-compiled pass on {', '.join(cpus)}. Drop one of the two, or train on GPUs."
        )
