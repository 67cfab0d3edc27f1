"""`segtrain tune`: a hyperparameter search over gin bindings, each trial a run of its own.

    segtrain tune --gin_file=gin/quickstart.gin --space=tune.yaml --model_dir=runs/study \\
        [--num_trials=20] [--parallel=N] [--pruner=median|hyperband|none] [--seed=0]

The search space (segtrain.tune.space) names gin bindings and their distributions; the study
(segtrain.tune.study) lives in model_dir/study.db and its trials in model_dir/trial_<n>/. At the
end the trials are listed and the best one's configuration is written to model_dir/best.gin.
Needs Optuna: ``pip install 'segtrain[tune]'``.
"""

from __future__ import annotations

from typing import Sequence

import gin
from absl import flags

from registry import DATASETS, LOSSES, MODELS, RegistryError
from segtrain.commands.common_flags import gin_flags
from segtrain.commands.configure import parse_config
from segtrain.errors import SegtrainError
from segtrain.runtime.lock import DirectoryLock


def run(model_dir: str | None, space_path: str | None, gin_files: Sequence[str], gin_params: Sequence[str],
        num_trials: int = 20, parallel: int = 1, pruner: str = "median", seed: int = 0) -> int:
    """Runs (or resumes) the study in ``model_dir``; writes and prints the best configuration."""
    if not model_dir:
        raise SegtrainError("--model_dir is required: the study's directory (study.db, a run directory per trial, "
                            "best.gin), e.g. --model_dir=runs/study.")
    if not space_path:
        raise SegtrainError("--space is required: a YAML or gin file of bindings to search, e.g. a line "
                            "'learning_rate.base: loguniform(1e-4, 1e-2)'.")
    if not gin_files and not gin_params:
        raise SegtrainError("Nothing to tune: give --gin_file (e.g. gin/quickstart.gin), the configuration every "
                            "trial starts from.")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SegtrainError("segtrain tune needs Optuna: pip install 'segtrain[tune]'.") from None
    from segtrain.tune import space as search_space
    from segtrain.tune.study import Study

    space = search_space.read(space_path)
    objective = check(space, gin_files, gin_params)
    with DirectoryLock(model_dir, "`segtrain tune`"):
        study = Study(model_dir, space, gin_files, gin_params, objective, pruner=pruner, seed=seed)
        study.run(num_trials, parallel)
        print("Trials:\n" + study.table())
        best = study.write_best()
    if best is None:
        raise SegtrainError(f"No trial of the study in {model_dir} completed: read the trials' train.log files.")
    winner = study.best()
    print(f"The best trial: {winner.number}, {objective.metric} {winner.value:.4f}. Its bindings:\n  "
          + "\n  ".join(space.bindings(winner.params))
          + f"\nWrote {best} (its whole configuration). Train it: segtrain train --gin_file={best} --model_dir=runs/best")
    return 0


def check(space, gin_files: Sequence[str], gin_params: Sequence[str]):
    """Parses the base configuration with every end of every dimension, before any trial runs:
    a misspelt binding, a bad value or an unknown plugin fails here, not in every trial.

    Returns:
      The study's Objective: the trials' train.best_metric, its direction, train.eval_split.
    """
    from segtrain.experiment import ExperimentConfig
    from segtrain.tune.study import Objective

    objective = None
    for bindings in space.corners():
        gin.clear_config()
        try:
            parse_config(gin_files, [*gin_params, *bindings])
            cfg = ExperimentConfig()
            for registry, name in ((MODELS, cfg.model), (LOSSES, cfg.loss), (DATASETS, cfg.dataset)):
                registry.get(name)
        except (SegtrainError, RegistryError) as e:
            raise SegtrainError(f"A trial of --space={space.path} would not train, with bindings "
                                f"{'; '.join(bindings)}: {e}") from None
        if objective is None:
            objective = Objective(cfg.best_metric, cfg.mode, cfg.eval_split)
            if not cfg.eval_every:
                print("train.eval_every is 0: each trial evaluates once, at its end, and no trial can be pruned.")
        elif (cfg.best_metric, cfg.mode) != (objective.metric, objective.mode):
            raise SegtrainError("The search space changes train.best_metric or its mode: every trial must be judged "
                                "by one metric.")
    gin.clear_config()
    return objective


def define_flags(fv):
    gin_flags(fv)
    flags.DEFINE_string("model_dir", None, "The study's directory: study.db (resumable), trial_<n>/ run directories, "
                        "best.gin.", flag_values=fv)
    flags.DEFINE_string("space", None, "The search space: a YAML or gin file of 'binding: distribution' lines, e.g. "
                        "'learning_rate.base: loguniform(1e-4, 1e-2)', 'train.loss: choice(\"dice\", \"focal\")'.",
                        flag_values=fv)
    flags.DEFINE_integer("num_trials", 20, "Trials the study ends with (a resumed study counts those it has).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("parallel", 1, "Trials at once, each in its own process on its own share of the GPUs (or "
                         "CPU cores).", lower_bound=1, flag_values=fv)
    flags.DEFINE_enum("pruner", "median", ["median", "hyperband", "none"], "Stops trials whose evaluations trail "
                      "the others' at the same step.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "The sampler's seed.", flag_values=fv)


def main(fv: flags.FlagValues) -> int:
    return run(fv.model_dir, fv.space, fv.gin_file, fv.gin_param, fv.num_trials, fv.parallel, fv.pruner, fv.seed)
