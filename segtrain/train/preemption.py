"""Preemption: SIGTERM or SIGINT saves a checkpoint at the next window end, then the run exits.

A scheduler that preempts a job (SLURM, Kubernetes, a cloud's spot VMs) sends SIGTERM and, after
a grace period, SIGKILL. The ``Preemption`` action turns the first into a checkpoint: the signal
handler only notes the signal; at the end of the window that is running (at most
``train.steps_per_loop`` steps, plus an evaluation or checkpoint that is due at that window's
end), every worker saves and the run ends with ``segtrain.errors.Interrupted``: exit status 143
for SIGTERM, 130 for SIGINT. Running the same command again resumes at exactly that step.

Under MultiWorkerMirroredStrategy the workers must save at the same step, and a scheduler may
signal only some of them. At every window end each worker contributes who it knows was
signalled to one small all-reduce over the strategy (a vector with one entry per task), so all
of them see the same answer at the same step and every worker saves there, its message naming
the tasks that were signalled.

Why not ``tf.distribute.experimental.PreemptionCheckpointHandler``: it counts its own ``run``
calls as steps, restores on construction from its own CheckpointManager (the trainer restores
through segtrain.train.checkpoints, with its errors and the non-chief scratch directories), saves
one step after the signal with a watcher thread and the coordination service's key-value store,
and exits the process itself from ``exit_fn``. Off Google Cloud it first probes the GCE metadata
server (``metadata.google.internal``, a 5 s timeout unless GCE_METADATA_IP is set). The
window-end agreement here needs none of that: one collective of a few integers per window, on
the strategy that already trains, and the exit is the CLI's, with its message.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import tensorflow as tf

from segtrain.errors import Interrupted, warn
from segtrain.train.checkpoints import Checkpoints
from segtrain.train.loop import Action, Window

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def tasks(strategy: tf.distribute.Strategy) -> tuple[list[str], int]:
    """The cluster's task names ("worker 1") in a fixed order, and this process's index in it."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return ["this process"], 0
    spec = resolver.cluster_spec().as_dict()
    names = [(kind, i) for kind in sorted(spec, key=lambda k: (k != "chief", k)) for i in range(len(spec[kind]))]
    return [f"{kind} {i}" for kind, i in names], names.index((resolver.task_type, resolver.task_id))


class Preemption(Action):
    """Saves and stops at the first window end after SIGTERM or SIGINT, agreed by every worker.

    A second SIGINT (Ctrl-C twice) stops at once, without saving.

    Args:
      checkpoints: the run's checkpoints.
      strategy: the run's strategy; under MultiWorkerMirroredStrategy the workers agree on the
        step through it.
      grace: train.preemption_grace, the seconds between the scheduler's SIGTERM and SIGKILL; a
        warning says when a window takes longer than that to end.
    """

    def __init__(self, checkpoints: Checkpoints, strategy: tf.distribute.Strategy, grace: float):
        self.checkpoints, self.strategy, self.grace = checkpoints, strategy, grace
        self.names, self.index = tasks(strategy)
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}
        self._failing = False  # closed on an error in a cluster: SIGTERM is only noted
        self._last_call: float | None = None
        self._windows = 0
        self._warned = False
        self._agree = tf.function(self._all_reduce) if len(self.names) > 1 else None

    # ---- signals ---------------------------------------------------------------------------
    def start(self, step: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self._failing and signum == signal.SIGTERM:
            os.write(2, b"\nReceived SIGTERM while stopping on an error: exiting once it is reported.\n")
            return
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
        # os.write, not print: the handler may run in the middle of another print.
        os.write(2, (f"\nReceived {signal.Signals(signum).name}: saving a checkpoint at the end of the "
                     f"current window of training steps, then stopping.\n").encode())

    def close(self) -> None:
        if sys.exc_info()[1] is not None and len(self.names) > 1 and self._previous:
            # A cluster worker that fails (a lost peer, mostly) reports the error and exits. The
            # launcher SIGTERMs the survivors as soon as one worker dies: with the default
            # handler back, that SIGTERM would kill this worker before it says what happened.
            # The handler stays until the process exits; a second Ctrl-C still stops at once.
            self._failing = True
            self._previous = {}
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    # ---- window ends -----------------------------------------------------------------------
    def _all_reduce(self, flags):
        per_replica = self.strategy.run(tf.identity, args=(flags,))
        return self.strategy.reduce("SUM", per_replica, axis=None)

    def signalled(self) -> dict[str, int]:
        """{task name: signal number} of every task signalled so far; the same on every worker."""
        if self._agree is None:
            return {self.names[0]: self.signum} if self.signum else {}
        flags = np.zeros(len(self.names), np.int64)
        flags[self.index] = self.signum or 0
        total = self._agree(tf.constant(flags)).numpy()
        local_replicas = max(1, self.strategy.num_replicas_in_sync // len(self.names))
        return {name: int(v) // local_replicas for name, v in zip(self.names, total) if v}

    def __call__(self, window: Window) -> None:
        self._check_grace()
        signalled = self.signalled()
        if not signalled:
            return
        path = self.checkpoints.save(window.step)
        signum = self.signum or next(iter(signalled.values()))
        name = signal.Signals(signum).name
        where = os.path.join(self.checkpoints.model_dir, os.path.basename(path))
        if len(self.names) == 1:
            who = f"by {name}"
        else:
            who = "after " + ", ".join(f"{task} received {signal.Signals(s).name}" for task, s in signalled.items())
        took = f" {time.monotonic() - self.received_at:.1f} s after the signal" if self.received_at else ""
        error = Interrupted(
            f"Stopped {who} at step {window.step}: saved {where}{took}. Run the same command again to resume "
            f"from step {window.step} (exit status {128 + signum}).", signum)
        error.hard_exit = len(self.names) > 1  # a cluster's teardown may wait on peers that are gone
        raise error

    def _check_grace(self) -> None:
        """Warns once when the time from one window end to the next exceeds the grace period.

        The first two intervals are left out: they trace the training step and the evaluation.
        """
        now = time.monotonic()
        if self._last_call is not None:
            self._windows += 1
            took = now - self._last_call
            if self._windows > 2 and took > self.grace and not self._warned:
                self._warned = True
                warn(f"A window of training steps (train.steps_per_loop, and the evaluation or checkpoint "
                     f"due at its end) took {took:.0f} s, longer than train.preemption_grace={self.grace:g} s: "
                     f"after a SIGTERM the scheduler may kill the run before it saves. Lower "
                     f"train.steps_per_loop, or raise train.preemption_grace to the scheduler's grace period.")
        self._last_call = now
