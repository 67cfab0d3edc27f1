"""`segtrain export`: a trained run as a TF SavedModel for serving (TF Serving, tf.saved_model.load).

The run is rebuilt by segtrain.commands.trained_run (weights only, no optimizer, no training split);
segtrain.export writes the SavedModel. The model's inference settings (gin ``inference.*``:
sliding window, scales, flips) are those `segtrain predict` uses. In a multi-worker cluster
(TF_CONFIG or SLURM) only the chief writes; the other tasks return at once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import gin
from absl import flags

from segtrain.commands.common_flags import bindings, own_flags, trained_run_flags, verbosity_flag
from segtrain.commands.trained_run import parse_run, restored
from segtrain.export import METADATA_FILE, check_output, export_model, output_names
from segtrain.runtime.cluster import detect_cluster


def run(model_dir: str | None, gin_files: Sequence[str], gin_params: Sequence[str], flags: dict) -> int:
    """Parses ``model_dir``'s operative config (then ``gin_files`` and ``gin_params``) and exports.

    Args:
      flags: output, checkpoint, probabilities and overwrite given on the command line; they win
        over gin.
    """
    parse_run(model_dir, gin_files, [*gin_params, *bindings("export", flags)])  # a flag given wins
    export(model_dir)
    return 0


@gin.configurable("export", denylist=["model_dir"])
def export(model_dir: str, output: str | None = None, checkpoint: str = "best", probabilities: bool = False,
           overwrite: bool = False) -> str | None:
    """Writes a trained run's model as a SavedModel with `serving_default` and `serving_bytes`.

    Args:
      model_dir: the run's directory.
      output: the SavedModel directory to write (for TF Serving: a numbered version directory,
        e.g. runs/quickstart/segtrain_model/1).
      checkpoint: 'best' (falls back to the latest when no best was kept), 'latest', or one by name
        ('ckpt-600', 'best/ckpt-400') or path.
      probabilities: the signatures also return softmax 'probabilities'.
      overwrite: replace an existing ``output`` (only once the new export is complete).

    Returns:
      The SavedModel's path, or None on a task of a cluster that is not the chief.

    Raises:
      SegtrainError: no --output, an existing one without --overwrite, no checkpoint.
    """
    cluster = detect_cluster()
    if cluster is not None and not cluster.is_chief:
        print(f"This is {cluster.task_type} {cluster.task_id} of a {cluster.num_tasks}-task cluster "
              f"({cluster.source}): the chief writes the export, so this task writes nothing.")
        return None
    check_output(output, overwrite)  # before the model is built: a refusal costs nothing
    experiment, path, step = restored(model_dir, checkpoint)
    info = experiment.info
    inference = experiment.inference()
    print(f"Exporting {os.path.basename(path)} (step {step}) of {model_dir}")
    metadata = {
        "class_names": list(info.class_names),
        "palette": [[int(c) for c in colour] for colour in info.palette],
        "dataset": info.name or experiment.config.dataset,
        "model": experiment.config.model,
        "precision": experiment.config.precision,
        "model_dir": os.path.abspath(model_dir),
        "checkpoint": os.path.abspath(path),
        "step": step,
    }
    metadata["inference"] = dataclasses.asdict(inference.options)
    written = export_model(output, experiment.model, inference.logits, experiment.normalization,
                           info.num_classes, experiment.facts.size_divisor, probabilities, metadata, overwrite)
    print(f"Wrote {written} (outputs: {', '.join(output_names(probabilities))}; labels explained in "
          f"{METADATA_FILE}). Inspect it with `saved_model_cli show --dir {written} --all`.")
    return written


def define_flags(fv):
    trained_run_flags(fv, "export")
    flags.DEFINE_string("output", None, "The SavedModel directory to write.", flag_values=fv)
    flags.DEFINE_bool("probabilities", False, "Also return softmax 'probabilities' from the signatures.",
                      flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing --output directory.", flag_values=fv)
    verbosity_flag(fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain export` from its parsed flags: each flag given is a gin binding of ``export.*``."""
    return run(fv.model_dir, fv.gin_file, fv.gin_param, own_flags(fv))
