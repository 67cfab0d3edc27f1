"""A trained run, rebuilt: what every command that uses a trained model starts from.

The run is rebuilt from ``model_dir/operative_config.gin`` as an Experiment: its model, dataset
and pipeline are exactly those it was trained with (gin files and bindings given on the command
line override them). Only the model's weights are restored; no optimizer is built and the
training split is never read.
"""

from __future__ import annotations

import os
from typing import Sequence

from segtrain import config, run_dir
from segtrain.errors import SegtrainError, data_errors
from segtrain.experiment import Experiment

# Registers every configurable a run's operative config holds (train.*, optimizer.*,
# distribute.*...), so that the config parses; nothing here builds them.
from segtrain.train import trainer  # noqa: F401


def parse_run(model_dir: str | None, gin_files: Sequence[str] = (), gin_params: Sequence[str] = ()) -> None:
    """Parses ``model_dir``'s operative config, then ``gin_files`` and ``gin_params`` (which win).

    Raises:
      SegtrainError: no --model_dir, or one `segtrain train` did not write.
    """
    run_dir.require(model_dir)
    operative = os.path.join(model_dir, run_dir.OPERATIVE_CONFIG)
    if not os.path.isfile(operative):
        raise SegtrainError(f"{operative} not found: --model_dir must be a directory `segtrain train` wrote.")
    config.parse([operative, *gin_files], gin_params)


def calibrated_binding(model_dir: str) -> str:
    """The gin binding that applies the temperature `segtrain evaluate --calibrate` fitted for the run.

    Raises:
      SegtrainError: the run has no calibration.json.
    """
    from segtrain.io import read_json

    path = os.path.join(run_dir.require(model_dir), run_dir.CALIBRATION)
    if not os.path.isfile(path):
        raise SegtrainError(f"--calibrated: {path} not found: fit the temperature first, with `segtrain evaluate "
                            f"--model_dir={model_dir} --calibrate`.")
    return f"inference.temperature = {float(read_json(path)['temperature'])!r}"


def restored(model_dir: str, checkpoint: str = "best", split: str | None = None,
             experiment: Experiment | None = None) -> tuple[Experiment, str, int]:
    """The parsed run's Experiment with the checkpoint's weights in its model.

    Args:
      model_dir: the run's directory (its config parsed with ``parse_run``).
      checkpoint: 'best' (the latest when no best was kept) or 'latest'.
      split: the split whose facts the model is built for (default: the run's eval split).
      experiment: the Experiment to restore into (default: a new one under the current strategy).

    Returns:
      (experiment, checkpoint path, training step of the checkpoint).
    """
    experiment = experiment or Experiment(split=split)
    with data_errors():
        path, step = experiment.restore(model_dir, checkpoint)
    return experiment, path, step
