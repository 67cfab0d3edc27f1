"""Tracing training steps A..B with the TensorFlow profiler (``--profile_steps=A,B``).

The trace goes into the run's TensorBoard directory for training, ``model_dir/train``
(``model_dir/train/plugins/profile/<time>/<host>.xplane.pb``), so ``tensorboard --logdir
model_dir`` shows it in its Profile tab (with ``pip install 'segtrain[profile]'``).

Steps A and B are global steps, 1-based, as the progress line counts them. The loop trains in
windows of ``train.steps_per_loop`` steps, one compiled call each; the profiler can only start
and stop between calls. So the ``Profiler`` action makes the loop end a window after step
A - 1 and after step B (through ``every``, the way an action asks for a window end), and the
trace holds exactly the windows of steps A..B: at most ``steps_per_loop`` steps each, each one
step marker in the Profile tab, numbered by its last step (``train.steps_per_loop = 1`` marks
every step). Ending windows there changes no result: a window's length is an argument of the
compiled loop, not a new trace of it. An evaluation or checkpoint that falls due inside A..B
is traced too, outside the markers. Without a GPU the Profile tab ties no ops to the markers
(they run inside the loop's tf.while_loop), so its step-time graph stays empty there; the
trace viewer and the op statistics still show them.

B past train.num_steps traces up to num_steps (with a warning); a resumed run that starts
inside A..B traces from where it starts; one that starts past B traces nothing and says so.
"""

from __future__ import annotations

import os
from typing import Callable

import tensorflow as tf

from segtrain import progress as progress_line
from segtrain import run_dir
from segtrain.errors import warn
from segtrain.train.loop import Action, Window


class Profiler(Action):
    """Traces training steps ``first``..``last`` into ``model_dir/train`` (the chief alone).

    Every worker ends its windows at the same steps (a cluster's workers must run the same
    windows, their collectives pair up), but only the chief traces: the trace is of the chief's
    host and devices, and there is one TensorBoard directory.

    Its ``around`` wraps the loop's window function: it starts and stops the trace right around
    the windows of ``first``..``last``, so the actions at their ends (evaluations, checkpoints)
    stay out of it, and marks each window as a step. ``close`` stops a trace that
    is still running, on every way out of the loop (an error, a stop, Ctrl-C, preemption).

    Args:
      steps: (first, last), train.profile_steps, 1 <= first <= last (ExperimentConfig checks).
      model_dir: the run's directory.
      num_steps: train.num_steps; ``last`` past it is lowered to it.
      chief: whether this process writes the trace.
    """

    def __init__(self, steps: tuple[int, int], model_dir: str, num_steps: int, chief: bool = True):
        self.asked = tuple(steps)
        self.first, self.last = steps[0], min(steps[1], num_steps)
        self.model_dir, self.num_steps, self.chief = model_dir, num_steps, chief
        self.logdir = os.path.join(model_dir, run_dir.TRAIN_LOGS)
        self.step = 0  # the step the loop is at (a window end)
        self.finished = False  # traced already, or nothing to trace: never again in this run
        self.tracing: int | None = None  # while the trace runs: its first step

    @property
    def every(self) -> int | None:  # the loop ends a window at the next multiple: at A - 1, then at B
        if self.finished:
            return None
        target = self.first - 1 if self.step < self.first - 1 else self.last
        return target if target > self.step else None

    def start(self, step: int) -> None:
        self.step = step
        what = f"--profile_steps={self.asked[0]},{self.asked[1]} (train.profile_steps)"
        if self.first > self.num_steps:
            self.finished = True
            if self.chief:
                warn(f"{what}: the run ends at train.num_steps={self.num_steps}, before step {self.first}: "
                     "nothing will be profiled.")
        elif step >= self.last:
            self.finished = True
            if self.chief:
                print(f"{what}: this run starts at step {step}, past step {self.last}: nothing to profile.")
        elif self.asked[1] > self.num_steps and self.chief:
            warn(f"{what}: step {self.asked[1]} is past train.num_steps={self.num_steps}: profiling steps "
                 f"{max(self.first, step + 1)}..{self.last}.")

    def rewind(self, step: int) -> None:
        self.step = step

    def __call__(self, window: Window) -> None:
        self.step = window.step
        if window.step >= self.last:
            self.finished = True  # on every worker, so every worker's windows stay alike

    def around(self, train_window: Callable[[int, int], Window]) -> Callable[[int, int], Window]:
        """``train_window`` that traces the windows of steps first..last, each one a step marker."""

        def window(step: int, n: int) -> Window:
            due = self.chief and not self.finished and self.tracing is None
            if due and step < self.last and step + n >= self.first:
                self._start(step + 1)
            if self.tracing is None:
                return train_window(step, n)
            with tf.profiler.experimental.Trace("train", step_num=step + n, _r=1):
                result = train_window(step, n)
            if result.step >= self.last:
                self._stop(result.step)
            return result

        return window

    def close(self) -> None:
        if self.tracing is not None:  # the loop ended inside first..last: keep what was traced
            self._stop(None)

    def _start(self, first: int) -> None:
        try:
            tf.profiler.experimental.start(self.logdir)
        except tf.errors.AlreadyExistsError:
            self.finished = True
            progress_line.end_line()
            warn(f"Not profiling steps {first}..{self.last}: another TensorFlow profiler is already running "
                 "in this process (a profiler server, or tf.profiler.experimental.start elsewhere).")
            return
        self.tracing = first
        progress_line.end_line()
        print(f"Profiling steps {first}..{self.last} into {os.path.join(self.logdir, 'plugins', 'profile')}",
              flush=True)

    def _stop(self, step: int | None) -> None:
        first = self.tracing
        self.tracing, self.finished = None, True  # first: a failing stop must not be retried
        progress_line.end_line()
        try:
            tf.profiler.experimental.stop()
        except tf.errors.OpError as e:
            warn(f"The profile of steps {first}..{self.last} could not be written to {self.logdir}: "
                 f"{e.message}")
            return
        runs = sorted(tf.io.gfile.glob(os.path.join(self.logdir, "plugins", "profile", "*")))
        where = runs[-1] if runs else os.path.join(self.logdir, "plugins", "profile")  # named by the time
        what = (f"Profiled steps {first}..{step}" if step is not None else
                f"The run ended while profiling steps {first}..{self.last}: wrote what was traced")
        print(f"{what} to {where}. View it in TensorBoard's Profile tab: tensorboard --logdir {self.model_dir} "
              "(the tab needs pip install 'segtrain[profile]': tensorboard-plugin-profile).", flush=True)
