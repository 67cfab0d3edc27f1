"""`segtrain evaluate`: a trained run's model on a split, from its operative config and checkpoint.

The run is rebuilt from model_dir/operative_config.gin as an Experiment: its model, dataset and
pipeline are exactly those it was trained with (gin files and bindings given on the command line
override them). Only the model's weights are restored; no optimizer is built and the training
split is never read.
"""

from __future__ import annotations

import os
from typing import Sequence

import gin

from segtrain import config
from segtrain.errors import SegtrainError, data_errors
from segtrain.evaluation import format_table, write_results
from segtrain.experiment import Experiment

# Registers every configurable a run's operative config holds (train.*, optimizer.*,
# distribute.*...), so that the config parses; nothing here builds them.
from segtrain.train import trainer  # noqa: F401


def run(model_dir: str | None, gin_files: Sequence[str], gin_params: Sequence[str], flags: dict) -> int:
    """Parses ``model_dir``'s operative config (then ``gin_files`` and ``gin_params``) and evaluates.

    Args:
      flags: split, checkpoint and batch_size given on the command line; they win over gin.
    """
    if not model_dir:
        raise SegtrainError("--model_dir is required: the run's directory, e.g. --model_dir=runs/quickstart.")
    operative = os.path.join(model_dir, "operative_config.gin")
    if not os.path.isfile(operative):
        raise SegtrainError(f"{operative} not found: --model_dir must be a directory `segtrain train` wrote.")
    config.parse([operative, *gin_files], gin_params)
    evaluate(model_dir, **flags)
    return 0


@gin.configurable("evaluate", denylist=["model_dir"])
def evaluate(model_dir: str, split: str = "test", checkpoint: str = "best", batch_size: int | None = None) -> dict:
    """Evaluates a trained run on a split; prints the table and writes model_dir/eval_results.json.

    Args:
      model_dir: the run's directory.
      split: dataset split to evaluate.
      checkpoint: 'best' (falls back to the latest when no best was kept) or 'latest'.
      batch_size: evaluation batch size (default: the run's eval batch size).

    Returns:
      The results: loss and every metric, plus 'split', 'step' and 'checkpoint'.
    """
    experiment = Experiment(split=split)
    with data_errors():
        path, step = experiment.restore(model_dir, checkpoint)
        print(f"Evaluating {os.path.basename(path)} (step {step}) of {model_dir} on split '{split}'")
        results, cm = experiment.evaluator().run(experiment.eval_dataset(split, batch_size))
    results.update({"split": split, "step": step, "checkpoint": os.path.basename(path),
                    "class_names": list(experiment.info.class_names), "confusion_matrix": cm.tolist()})
    shown = {k: v for k, v in results.items()
             if k not in ("split", "step", "checkpoint", "class_names", "confusion_matrix")}
    print(format_table(shown, experiment.info.class_names))
    out = os.path.join(model_dir, "eval_results.json")
    write_results(out, results)
    print(f"Wrote {out}")
    return results
