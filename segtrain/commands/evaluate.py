"""`segtrain evaluate`: a trained run's model on a split, from its operative config and checkpoint.

The run is rebuilt by segtrain.commands.trained_run: only the model's weights are restored, no
optimizer is built and the training split is never read. The model runs as ``inference.*`` (or
the --mode/--crop_size/--stride/--scales/--flip flags) say, over every replica of the strategy,
and is scored at the labels' own size.

Writes, in the run directory: ``eval_results.json`` (every metric, per-class values by class
name, the confusion matrix, how the model was run) and ``confusion_matrix.png``. Then, unless
``--nofailures``, where the model fails (segtrain.failures): the worst images as panels,
boundary IoU, IoU by object size and the calibration error, in eval_results.json under
``failures``, in ``failures/`` (panels, reliability diagram) and in TensorBoard (``evaluate/``).
``--calibrate`` first fits a temperature on the run's validation split (``calibration.json``),
which predict and export apply with ``--calibrated``.
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
             cpu_replicas: int = 0, export: str | None = None, failures: bool = True, worst: int = 8,
             calibrate: bool = False, boundary_ratio: float = 0.02,
             object_sizes: Sequence[int] = (32 ** 2, 96 ** 2)) -> dict:
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
      failures: also report where the model fails (segtrain.failures): worst images, boundary
        IoU, IoU by object size, calibration.
      worst: how many of the worst images become panels.
      calibrate: first fit a temperature on the run's validation split (train.eval_split), write it
        to calibration.json, and report the calibration error with it too.
      boundary_ratio: boundary IoU's width, a fraction of the image diagonal (Cheng et al.: 0.02).
      object_sizes: pixel counts between small, medium and large objects (COCO's 32^2, 96^2).

    Returns:
      The results: loss and every metric, plus 'split', 'step', 'checkpoint', 'inference',
      'class_names', 'per_class', 'confusion_matrix' (and 'postprocessed').
    """
    if export:
        given = {"--mode": mode, "--crop_size": crop_size, "--stride": stride, "--scales": scales, "--flip": flip,
                 "--postprocess": postprocess, "--cpu_replicas": cpu_replicas or None,
                 "--calibrate": calibrate or None}
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
    views = None
    if failures or calibrate:
        with data_errors(lambda e: experiment.damaged_data(e, [split, experiment.config.eval_split])):
            temperature = fit_temperature(experiment, inference, model_dir, path, step, batch_size) if calibrate \
                else recorded_temperature(model_dir)
            if failures:
                views = failure_views(experiment, inference, split, batch_size, worst, temperature, boundary_ratio,
                                      object_sizes)
                results["failures"] = views[0]
    write_evaluation(model_dir, results, cm, names, title)
    if views is not None:  # the results first: the pictures are what a full disk may cost
        write_failures(model_dir, split, step, title, *views)
    return results


def _examples(experiment, inference, dataset):
    """(truth [h, w], logits [h, w, C] at the model's own temperature, image [H, W, C], image size) of each
    example of ``dataset``, at the label's size, one batch of inference at a time."""
    import numpy as np

    from segtrain.evaluation import fit_to_labels

    logits_of = tf.function(inference.logits, reduce_retracing=True)
    temperature = inference.task.temperature
    for batch in dataset:
        logits = fit_to_labels(tf.cast(logits_of(batch["image"]), tf.float32), batch, tf.shape(batch["label"])[1:3])
        logits = logits.numpy() / temperature
        labels = batch["label"].numpy()
        label_sizes = batch["label_size"].numpy() if "label_size" in batch else None
        for i in range(labels.shape[0]):
            lh, lw = label_sizes[i] if label_sizes is not None else labels.shape[1:3]
            yield (labels[i, :lh, :lw].astype(np.int64), logits[i, :lh, :lw],
                   batch["image"][i], batch["image_size"][i].numpy() if "image_size" in batch else None)


def fit_temperature(experiment, inference, model_dir: str, path: str, step: int, batch_size: int | None) -> float:
    """Fits the temperature on the run's validation split (train.eval_split); writes calibration.json."""
    from segtrain import failures
    from segtrain.io import write_json
    from segtrain.progress import Progress

    split = experiment.config.eval_split
    sample = failures.PixelSample(inference.task, seed=experiment.config.seed)
    progress = Progress(f"calibrate ({split})", None, unit="image")
    for n, (truth, logits, _, _) in enumerate(_examples(experiment, inference, experiment.eval_dataset(split,
                                                                                                        batch_size)), 1):
        sample.add(truth, logits)
        progress.update(n)
    progress.close()
    if not sample.labels.size:
        raise SegtrainError(f"--calibrate: split '{split}' has no labelled pixel to fit a temperature on.")
    temperature, before, after = failures.fit_temperature(sample.logits, sample.labels, inference.task)
    out = os.path.join(model_dir, run_dir.CALIBRATION)
    write_json(out, {"temperature": temperature, "split": split, "checkpoint": os.path.basename(path), "step": step,
                     "nll": before, "nll_calibrated": after, "pixels": int(sample.labels.size),
                     "pixels_seen": int(sample.seen)})
    print(f"Temperature {temperature:.4f} fitted on {sample.labels.size:,} pixels of '{split}' (negative log likelihood "
          f"{before:.4f} -> {after:.4f}). Wrote {out}; predict and export apply it with --calibrated.")
    return temperature


def recorded_temperature(model_dir: str) -> float | None:
    """The temperature calibration.json holds, or None."""
    from segtrain.io import read_json

    path = os.path.join(model_dir, run_dir.CALIBRATION)
    return float(read_json(path)["temperature"]) if os.path.isfile(path) else None


def failure_views(experiment, inference, split: str, batch_size: int | None, worst: int, temperature: float | None,
                  boundary_ratio: float, object_sizes: Sequence[int]) -> tuple[dict, list]:
    """One more pass over ``split``: the views of segtrain.failures, and the worst images' panels,
    worst first."""
    import heapq


    from segtrain import failures
    from segtrain.progress import Progress

    info = experiment.info
    views = failures.Failures(inference.task, list(info.class_names), worst=worst, boundary_ratio=boundary_ratio,
                              object_sizes=tuple(object_sizes), temperature=temperature)
    kept: list = []  # a heap of the worst images so far: (-iou, -index, panel)
    progress = Progress(f"failures ({split})", None, unit="image")
    palette = info.palette_array()
    for index, (truth, logits, image, image_size) in enumerate(
            _examples(experiment, inference, experiment.eval_dataset(split, batch_size))):
        views.add(index, truth, logits)
        iou = views.images[-1][0]
        if worst and (len(kept) < worst or (-iou, -index) > kept[0][:2]):
            shown = image if image_size is None else image[:image_size[0], :image_size[1]]
            if tuple(shown.shape[:2]) != truth.shape:
                shown = tf.image.resize(shown, truth.shape, method="bilinear")
            predicted = failures.predict_np(failures.probabilities_np(logits, inference.task), inference.task)
            panel = failures.error_panel(experiment.normalization.display(shown), truth, predicted, palette,
                                         info.ignore_label)
            item = (-iou, -index, panel)
            if len(kept) < worst:
                heapq.heappush(kept, item)
            else:
                heapq.heapreplace(kept, item)
        progress.update(index + 1)
    progress.close()
    panels = [(-neg_iou, -neg_index, panel) for neg_iou, neg_index, panel in sorted(kept, reverse=True)]
    return views.results(), panels


def write_failures(model_dir: str, split: str, step: int, title: str, out: dict, panels: list) -> None:
    """The worst images' panels and the reliability diagram in model_dir/failures/, the views in
    TensorBoard (model_dir/evaluate/), and their table printed."""
    from segtrain import images

    folder = os.path.join(model_dir, run_dir.FAILURES_DIR)
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):  # the panels of an earlier evaluation
        if old.startswith("worst_") and old.endswith(".png"):
            os.remove(os.path.join(folder, old))
    for rank, (iou, index, panel) in enumerate(panels, 1):
        images.write_image(os.path.join(folder, f"worst_{rank:02d}_image_{index}.png"), panel)
    reliability = None
    if plots.have_matplotlib():
        calibrated = ({**out["reliability_calibrated"], "ece": out["ece_calibrated"]}
                      if "temperature" in out else None)
        reliability = plots.reliability_png(out["reliability"], out["ece"], title, calibrated)
        from segtrain.io import atomic_write_bytes

        atomic_write_bytes(os.path.join(folder, "reliability.png"), reliability)
    _summarise_failures(model_dir, split, step, out, [p for _, _, p in panels], reliability)
    print(failures_table(out, split, folder))


def failures_table(out: dict, split: str, folder: str) -> str:
    """The failure views as a few plain lines."""
    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.4f}"

    sizes = "  ".join(f"{size} {fmt(v['mean_iou'])} ({v['objects']} objects)" for size, v in out["iou_by_size"].items())
    calibrated = (f"  (temperature {out['temperature']:.3f}: {fmt(out['ece_calibrated'])})"
                  if "temperature" in out else "")
    worst = ", ".join(f"#{w['index']} {fmt(w['iou'])}" for w in out["worst_images"])
    return "\n".join([f"Where the model fails on '{split}' ({out['images']} images):",
                      f"  boundary_iou        {fmt(out['boundary_iou'])}",
                      f"  iou by object size  {sizes}",
                      f"  ece                 {fmt(out['ece'])}{calibrated}",
                      f"  worst images (IoU)  {worst}",
                      f"  panels and reliability diagram: {folder}"])


def _summarise_failures(model_dir: str, split: str, step: int, out: dict, panels, reliability: bytes | None) -> None:
    """The failure views in TensorBoard, under model_dir/evaluate/, at the checkpoint's step."""
    from segtrain.train import summaries

    writer = summaries.EventWriter(os.path.join(model_dir, run_dir.EVALUATE_LOGS))
    try:
        values = {f"{split}/boundary_iou": out["boundary_iou"], f"{split}/ece": out["ece"],
                  **{f"{split}/iou_by_size/{size}": v["mean_iou"] for size, v in out["iou_by_size"].items()}}
        if "ece_calibrated" in out:
            values[f"{split}/ece_calibrated"] = out["ece_calibrated"]
        summaries.write_scalars(writer, {k: v for k, v in values.items() if v == v}, step)
        if panels:
            summaries.write_images(writer, f"{split}/worst_images", panels, step)
        if reliability is not None:
            summaries.write_images(writer, f"{split}/reliability", [tf.io.decode_png(reliability, 3).numpy()], step)
    finally:
        writer.close()


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
    flags.DEFINE_bool("failures", True, "Also show where the model fails: the worst images as panels, boundary IoU, "
                      "IoU by object size, calibration error and reliability diagram (gin: evaluate.failures).",
                      flag_values=fv)
    flags.DEFINE_integer("worst", 8, "How many of the worst images (by their IoU) become panels (gin: evaluate.worst).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("calibrate", False, "First fit a temperature on the run's validation split (calibration.json), "
                      "which predict and export apply with --calibrated (gin: evaluate.calibrate).", flag_values=fv)
    verbosity_flag(fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain evaluate` from its parsed flags: each flag given is a gin binding of ``evaluate.*``."""
    return run(fv.model_dir, fv.gin_file, fv.gin_param, own_flags(fv))
