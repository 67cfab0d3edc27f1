"""The training loop: run a window of steps, call the actions, stop when one says so.

Everything a run does besides the steps themselves (checkpoints, evaluation, summaries, early
stopping, ...) is an ``Action`` (segtrain.train.actions), the pattern of Orbit's actions and
MMEngine's hooks. A new behaviour is a new action; the loop does not change.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass
class Window:
    """What one window of training steps produced. Actions read it, and may add to it.

    Attributes:
      step: the global step at the end of the window.
      steps: how many steps the window ran.
      losses: the loss of each of those steps.
      scalars: the window's training scalars (loss, learning rate, speed...).
      images_per_second: training speed over the window.
      last: the window ends the run (step == train.num_steps).
      eval: (results, confusion matrix) when an evaluation ran at this window's end.
      images: pictures actions made at this window's end, by tag (ImagePanels: 'examples'), for
        later actions (the trackers) to pass on.
    """

    step: int
    steps: int
    losses: np.ndarray
    scalars: dict
    images_per_second: float
    last: bool = False
    eval: tuple[dict, np.ndarray] | None = None
    images: dict = dataclasses.field(default_factory=dict)


class Rewind(Exception):
    """Raised by an action to go back to ``step`` (a restored checkpoint's) and train on.

    The actions after it do not see the window; every action's ``rewind`` is told the step.
    """

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


class Action:
    """Something a run does at window ends. Subclasses override what they need.

    Attributes:
      every: the loop ends a window at every multiple of this step count (None: no wish), so
        an action that acts "every N steps" sees a window end exactly there.
    """

    every: int | None = None

    def around(self, train_window: Callable[[int, int], "Window"]) -> Callable[[int, int], "Window"]:
        """The window function the loop calls, wrapped by this action (default: as it is). The
        profiler traces the windows of its steps this way."""
        return train_window

    def start(self, step: int) -> None:
        """Before the first window; ``step`` is where the run starts (0, or a restored step)."""

    def __call__(self, window: Window) -> bool | None:
        """At a window's end. Returns True to stop the run after this window."""

    def rewind(self, step: int) -> None:
        """The run went back to ``step`` (see Rewind): forget what was done after it."""

    def end(self, step: int) -> None:
        """After the last window, when the run ended normally (num_steps, or a stop)."""

    def close(self) -> None:
        """Always, last: release what the action holds."""


def action_name(action: Action) -> str:
    """An action's name in ``train.drop_actions``: its class name in snake case (ImagePanels:
    image_panels)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type(action).__name__).lower()


def due(window: Window, every: int | None) -> bool:
    """Whether something done every ``every`` steps (and at the end) is due at this window."""
    return window.last or bool(every and window.step % every == 0)


# --8<-- [start:run]  (docs/pages/architecture.md includes the loop from here)
def run(train_window: Callable[[int, int], Window], actions: Sequence[Action], start: int, num_steps: int,
        steps_per_loop: int) -> int:
    """Trains from ``start`` to ``num_steps`` in windows of at most ``steps_per_loop`` steps.

    Args:
      train_window: ``train_window(step, n)`` trains ``n`` steps from ``step``; returns a Window.
      actions: called in order at every window end.
      start, num_steps: the first and the final step.
      steps_per_loop: the longest window.

    Returns:
      The step the run ended at.
    """
    step, stop = start, False
    for action in actions:  # the last action's wrapping is the outermost
        train_window = action.around(train_window)
    try:
        for action in actions:
            action.start(step)
        while step < num_steps and not stop:
            n = min([steps_per_loop, num_steps - step] + [a.every - step % a.every for a in actions if a.every])
            window = train_window(step, n)
            step = window.step
            window.last = step >= num_steps
            try:
                stop = any([action(window) for action in actions])  # a list: every action sees the window
            except Rewind as rewind:
                step, stop = rewind.step, False
                for action in actions:
                    action.rewind(step)
        for action in actions:
            action.end(step)
        return step
    finally:
        for action in actions:
            action.close()
# --8<-- [end:run]
