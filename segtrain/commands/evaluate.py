"""`segtrain evaluate`: a trained run's model on a split, from its operative config and checkpoint.

The run is rebuilt by segtrain.commands.trained_run: only the model's weights are restored, no
optimizer is built and the training split is never read. The model runs as ``inference.*`` (or
the --mode/--crop_size/--stride/--scales/--flip flags) say, over every replica of the strategy,
and is scored at the labels' own size.

Writes, in the run directory: ``eval_results.json`` (every metric, per-class values by class
name, the confusion matrix, how the model was run) and ``confusion_matrix.png``.
"""

from __future__ import annotations

import os
from typing import Sequence

import gin
import tensorflow as tf
from absl import flags

from segtrain import plots
from segtrain import run_dir
from segtrain.commands.common_flags import bindings, inference_flags, own_flags, trained_run_flags, verbosity_flag
from segtrain.commands.trained_run import parse_run, restored
from segtrain.errors import SegtrainError, data_errors
from segtrain.evaluation import format_table, per_class, results_record, write_results


INFERENCE_FLAGS = ("mode", "crop_size", "stride", "scales", "flip")


def run(model_dir: str | None, gin_files: Sequence[str], gin_params: Sequence[str], flags: dict) -> int:
    """Parses ``model_dir``'s operative config (then ``gin_files`` and ``gin_params``) and evaluates.

    Args:
      flags: the command line's flags (split, checkpoint, batch_size, the inference flags,
        postprocess, cpu_replicas); they win over gin.
    """
    model_dir = model_dir or export_run(flags.get("export"))
    parse_run(model_dir, gin_files, [*gin_params, *bindings("evaluate", flags)])  # a flag given wins
    evaluate(model_dir)
    return 0


def export_run(export: str | None) -> str | None:
    """The run directory an export came from (its segtrain_export.json says), or None."""
    if not export:
        return None
    from segtrain.export.runtime import read_metadata

    return read_metadata(export)[1].get("model_dir")


def strategy_for(cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """Mirrored over the local GPUs (2 or more), or over ``cpu_replicas`` logical CPUs; else the default.

    Evaluation never joins a cluster: a multi-worker run is evaluated on one machine.
    """
    from segtrain.runtime.distribute import build_strategy

    if cpu_replicas:
        return build_strategy("mirrored", cpu_replicas=cpu_replicas)
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def postprocessor_for(name: str | None, refine: bool = True):
    """The registered post-processor ``name`` built from its gin settings (None: none); with
    ``refine``, one that refines the probabilities (an instance maker is refused)."""
    if not name:
        return None
    from segtrain import postprocess

    return postprocess.build(name, need="probabilities" if refine else None)


@gin.configurable("evaluate", denylist=["model_dir"])
def evaluate(model_dir: str, split: str = "test", checkpoint: str = "best", batch_size: int | None = None,
             mode: str | None = None, crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None,
             scales: Sequence[float] | None = None, flip: bool | None = None, postprocess: str | None = None,
             cpu_replicas: int = 0, export: str | None = None) -> dict:
    """Evaluates a trained run on a split; prints the table and writes the results and the picture.

    Args:
      model_dir: the run's directory.
      split: dataset split to evaluate.
      checkpoint: 'best' (falls back to the latest when no best was kept), 'latest', or one by name
        ('ckpt-600', 'best/ckpt-400') or path.
      batch_size: evaluation batch size (default: the run's eval batch size).
      mode, crop_size, stride, scales, flip: how the model runs (default: gin's inference.*).
      postprocess: a registered refining post-processor (e.g. 'dense_crf'): the metrics are
        reported with and without it.
      cpu_replicas: mirror over this many logical CPUs (machines without GPUs; tests).
      export: evaluate this export (a directory `segtrain export` wrote, or its model file) in its
        own runtime instead of a checkpoint; the results and picture go into the export's directory.

    Returns:
      The results: loss and every metric, plus 'split', 'step', 'checkpoint', 'inference',
      'class_names', 'per_class', 'confusion_matrix' (and 'postprocessed').
    """
    if export:
        given = {"--mode": mode, "--crop_size": crop_size, "--stride": stride, "--scales": scales, "--flip": flip,
                 "--postprocess": postprocess, "--cpu_replicas": cpu_replicas or None}
        return evaluate_export(model_dir, export, split, batch_size, [k for k, v in given.items() if v is not None])
    processor = postprocessor_for(postprocess)
    from segtrain.experiment import Experiment

    experiment = Experiment(strategy=strategy_for(cpu_replicas), split=split)
    experiment, path, step = restored(model_dir, checkpoint, split, experiment=experiment)
    inference = experiment.inference(mode=mode, crop_size=crop_size, stride=stride, scales=scales, flip=flip)
    replicas = experiment.strategy.num_replicas_in_sync
    with data_errors(lambda e: experiment.damaged_data(e, [split])):
        print(f"Evaluating {os.path.basename(path)} (step {step}) of {model_dir} on split '{split}': "
              f"{inference.options.describe()}" + (f", then {postprocess}" if postprocess else "")
              + (f", over {replicas} replicas" if replicas > 1 else ""))
        results, cm = experiment.evaluator(inference).run(
            experiment.eval_dataset(split, batch_size), postprocessor=processor,
            normalization=experiment.normalization)
    names = list(experiment.info.class_names)
    post = results.pop("postprocessed", None)
    print(format_table(results, names, post, postprocess))
    results = results_record(results, cm, names, split, step, inference.options.describe(), os.path.basename(path))
    if post is not None:
        post["per_class"] = per_class(post, names)
        results["postprocessed"] = {"postprocess": postprocess, **post}
    title = f"{experiment.info.name or 'dataset'} {split}, step {step}\n{inference.options.describe()}"
    write_evaluation(model_dir, results, cm, names, title)
    return results


def write_evaluation(directory: str, results: dict, cm, names: Sequence[str], title: str) -> None:
    """eval_results.json and the confusion picture of one evaluation, written into ``directory``."""
    out = os.path.join(directory, run_dir.RESULTS)
    write_results(out, results)
    print(f"Wrote {out}")
    picture = os.path.join(directory, run_dir.CONFUSION_PICTURE)
    if plots.write_confusion_matrix(picture, cm, names, title):
        print(f"Wrote {picture}")


def evaluate_export(model_dir: str, export: str, split: str = "test", batch_size: int | None = None,
                    refused: Sequence[str] = ()) -> dict:
    """Evaluates an export (any format) in its own runtime on a split of its run's dataset.

    Writes eval_results.json and confusion_matrix.png into the export's directory.
    """
    from segtrain.evaluation import evaluate_exported
    from segtrain.experiment import Experiment
    from segtrain.export.runtime import load

    if refused:
        raise SegtrainError(f"{', '.join(refused)}: an export runs as it was exported (its inference settings are "
                            f"inside it); evaluate the checkpoint for other settings, or export again.")
    exported = load(export)
    metadata = exported.metadata
    experiment = Experiment(split=split)
    if int(experiment.info.num_classes) != exported.num_classes:
        raise SegtrainError(f"--export={export} has {exported.num_classes} classes, but split '{split}' of "
                            f"{model_dir}'s dataset has {experiment.info.num_classes}: not this run's export.")
    step = int(metadata.get("step", -1))
    with data_errors(lambda e: experiment.damaged_data(e, [split])):
        print(f"Evaluating the {exported.describe()} (step {step} of {model_dir}) on split '{split}'")
        results, cm = evaluate_exported(exported.logits, experiment.eval_dataset(split, batch_size), experiment.info,
                                        experiment.loss_fn, experiment.normalization, experiment.metric_names,
                                        task=exported.task)
    names = list(experiment.info.class_names)
    print(format_table(results, names))
    results = results_record(results, cm, names, split, step, exported.describe(),
                             os.path.basename(metadata.get("checkpoint", "")))
    results["export"] = os.path.abspath(exported.path)
    write_evaluation(exported.directory, results, cm, names, f"{exported.describe()}\n{split}, step {step}")
    return results


def define_flags(fv):
    trained_run_flags(fv, "evaluate")
    flags.DEFINE_string("split", "test", "The dataset split to evaluate (gin: evaluate.split).", flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "Batch size (default: the run's; gin: evaluate.batch_size).",
                         lower_bound=1, flag_values=fv)
    inference_flags(fv, "evaluate")
    flags.DEFINE_string("export", None, "Evaluate this export (a directory `segtrain export` wrote, or its "
                        "model.tflite / model.onnx) in its own runtime instead of a checkpoint; --model_dir defaults "
                        "to its run. Results go into the export's directory.", flag_values=fv)
    flags.DEFINE_integer("cpu_replicas", 0, "Mirror the evaluation over N logical CPUs (machines without GPUs; "
                         "several GPUs are used by themselves).", lower_bound=0, flag_values=fv)
    verbosity_flag(fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain evaluate` from its parsed flags: each flag given is a gin binding of ``evaluate.*``."""
    return run(fv.model_dir, fv.gin_file, fv.gin_param, own_flags(fv))
