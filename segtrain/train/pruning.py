"""A trial of `segtrain tune` reports its evaluations to the study, and stops when pruned.

`segtrain tune` starts each trial as a `segtrain train` with ``SEGTRAIN_TUNE_TRIAL`` in its
environment: the study's storage, the trial and the metric (segtrain.tune.study). Then the
trainer adds ``ReportToStudy`` after the evaluation: each evaluation's value of the metric is the
trial's intermediate value at that step, and when the study's pruner judges the trial worse than
its peers at that step, the run stops there (as early stopping does) and leaves ``pruned.json``
for tune to read. A run without that variable has no such action.
"""

from __future__ import annotations

import json
import math
import os

from segtrain.errors import SegtrainError
from segtrain.io import write_json
from segtrain.train.loop import Action, Window

TRIAL_ENV = "SEGTRAIN_TUNE_TRIAL"
PRUNED_RECORD = "pruned.json"
PRUNERS = ("median", "hyperband", "none")


def make_pruner(name: str):
    """The Optuna pruner called ``name`` (tune and its trials build the same one: a study's
    pruner is not stored with it)."""
    import optuna

    if name == "median":  # two finished trials before any is pruned
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SegtrainError(f"--pruner={name}: use one of {', '.join(PRUNERS)}.")


def trial_from_environment() -> dict | None:
    """The trial this process trains for `segtrain tune`, or None."""
    text = os.environ.get(TRIAL_ENV)
    if not text:
        return None
    try:
        trial = json.loads(text)
        return {k: trial[k] for k in ("storage", "study", "trial_id", "number", "metric", "pruner")}
    except (ValueError, KeyError, TypeError):
        raise SegtrainError(f"{TRIAL_ENV} is set but is not what `segtrain tune` writes ({text[:200]!r}): unset it to "
                            f"train outside a study.") from None


class ReportToStudy(Action):
    """Reports each evaluation to the trial; stops the run when the pruner prunes it.

    Args:
      trial: what trial_from_environment returns.
      model_dir: the trial's run directory (pruned.json goes there).
      multi_worker: the run is a cluster job; a trial runs on one machine (every worker would
        have to take the pruner's decision at the same step).
    """

    def __init__(self, trial: dict, model_dir: str, multi_worker: bool = False):
        if multi_worker:
            raise SegtrainError("A `segtrain tune` trial trains on one machine (its GPUs or CPU cores): "
                                "distribute.strategy = 'multi_worker' is not for trials.")
        self.spec, self.model_dir = trial, model_dir
        self.metric = trial["metric"]
        self.trial = None

    def start(self, step: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=self.spec["study"], pruner=make_pruner(self.spec["pruner"]),
                                  storage=optuna.storages.RDBStorage(
                                      self.spec["storage"], engine_kwargs={"connect_args": {"timeout": 60}}))
        self.trial = optuna.trial.Trial(study, self.spec["trial_id"])

    def __call__(self, window: Window) -> bool:
        if window.eval is None:
            return False
        value = float(window.eval[0][self.metric])
        if not math.isfinite(value):
            return False
        self.trial.report(value, window.step)
        if window.last or not self.trial.should_prune():
            return False
        write_json(os.path.join(self.model_dir, PRUNED_RECORD), {"step": window.step, "value": value})
        print(f"Trial {self.spec['number']} pruned at step {window.step}: {self.metric} {value:.4f} is behind the "
              f"study's other trials at this step.", flush=True)
        return True
