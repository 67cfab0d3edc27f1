"""MODEL_CARD.md: what an export is, what it was trained on, how well it and its checkpoint do.

Written into the export directory by `segtrain export`, next to the pictures it shows:

- the classes (index, name, colour) and the input contract (input, outputs, normalisation);
- the training: dataset and split, steps, model, precision, the run directory;
- the checkpoint's evaluation table and, with ``--evaluate_split``, the export's own, side by
  side with what the conversion cost; the export's confusion picture (``confusion_matrix.png``)
  and results (``eval_results.json``);
- one Grad-CAM example of the checkpoint (``gradcam.png``);
- the command that made the export.
"""

from __future__ import annotations

import json
import os

import numpy as np

from segtrain import images, plots, run_dir
from segtrain.errors import data_errors
from segtrain.evaluation import evaluate_exported, results_record, write_results
from segtrain.io import atomic_write_bytes, atomic_write_text

CARD_FILE = "MODEL_CARD.md"
GRADCAM_PICTURE = "gradcam.png"
SUMMARY_KEYS = ("loss", "pixel_accuracy", "mean_accuracy", "mean_iou")


def write(directory: str, exported, experiment, inference, checkpoint_path: str, step: int,
          split: str | None = None) -> None:
    """Writes MODEL_CARD.md and its pictures into ``directory`` (the export's, before it lands).

    Args:
      exported: the export, loaded (segtrain.export.runtime.Exported).
      experiment: the run's Experiment, its checkpoint restored.
      inference: how the checkpoint runs (the export runs the same).
      checkpoint_path, step: the checkpoint exported.
      split: evaluate the checkpoint and the export on this split (None: show the run's own
        evaluation of this checkpoint, when it made one).
    """
    info, names = experiment.info, list(experiment.info.class_names)
    checkpoint, export, source = None, None, None
    if split:
        with data_errors(lambda e: experiment.damaged_data(e, [split])):
            print(f"Evaluating the checkpoint on split '{split}'")
            checkpoint, _ = experiment.evaluator(inference).run(experiment.eval_dataset(split), label="checkpoint")
            print(f"Evaluating the export on split '{split}'")
            export, cm = evaluate_exported(exported.logits, experiment.eval_dataset(split), info, experiment.loss_fn,
                                           experiment.normalization, experiment.metric_names, label="export",
                                           task=exported.task)
        record = results_record(dict(export), cm, names, split, step, inference.options.describe(),
                                os.path.basename(checkpoint_path))
        record["export"] = exported.describe()
        write_results(os.path.join(directory, run_dir.RESULTS), record)
        plots.write_confusion_matrix(os.path.join(directory, run_dir.CONFUSION_PICTURE), cm, names,
                                     f"{exported.describe()}\n{split}, step {step}")
        source = f"split '{split}', evaluated at export"
    else:
        split = experiment.config.eval_split
        checkpoint = _in_run(exported.metadata.get("model_dir"), split, step)
        if checkpoint is not None:
            source = f"split '{split}', the run's own evaluation at step {step}"
    gradcam = _gradcam(directory, experiment, inference, split)
    atomic_write_text(os.path.join(directory, CARD_FILE),
                      card(exported.metadata, names, info.palette, checkpoint, export, source, gradcam,
                           os.path.exists(os.path.join(directory, run_dir.CONFUSION_PICTURE))))


def _in_run(model_dir: str | None, split: str, step: int) -> dict | None:
    """The run's last in-run evaluation of ``split``, if it was made at ``step``."""
    if not model_dir:
        return None
    try:
        with open(os.path.join(model_dir, run_dir.in_run_results(split))) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if results.get("step") == step else None


def _gradcam(directory: str, experiment, inference, split: str) -> str | None:
    """Grad-CAM of the checkpoint on the first image of ``split`` for its most predicted class
    (other than class 0 where it predicts any), written as gradcam.png; its caption, or None."""
    from segtrain import explain

    try:
        cam = explain.GradCam(experiment.model, task=inference.task)
    except Exception as e:  # a model Grad-CAM cannot take: the card says so
        return f"Grad-CAM is not available for this model ({e})."
    with data_errors(lambda e: experiment.damaged_data(e, [split])):
        batch = next(iter(experiment.eval_dataset(split, batch_size=1)), None)
    if batch is None:
        return None
    h, w = (int(v) for v in batch["image_size"][0])
    normalised = batch["image"][0, :h, :w].numpy()
    logits = inference.logits(batch["image"][:, :h, :w])[0].numpy()
    task = inference.task
    if task.multilabel:  # every label is a foreground: the one predicted on most pixels
        class_id = int(np.argmax([task.region(logits, i).numpy().sum() for i in range(task.num_classes)]))
    else:
        counts = np.bincount(np.argmax(logits, -1).ravel(), minlength=logits.shape[-1])
        class_id = int(np.argmax(counts[1:]) + 1) if counts[1:].sum() else 0
    result = cam(normalised, class_id)
    pixels = experiment.normalization.display(normalised)
    atomic_write_bytes(os.path.join(directory, GRADCAM_PICTURE), images.encode(explain.overlay(pixels, result.cam)))
    name = experiment.info.class_names[class_id]
    return (f"Grad-CAM of class '{name}' at layer `{cam.layer}` on the first image of split '{split}' "
            f"({w}x{h} pixels): where the checkpoint looks when it predicts '{name}'.")


def _table(checkpoint: dict | None, export: dict | None, names) -> str:
    """The summary metrics of the checkpoint and the export side by side, then per-class IoU."""
    columns = [(title, r) for title, r in (("checkpoint", checkpoint), ("export", export)) if r is not None]
    lines = ["| metric | " + " | ".join(t for t, _ in columns) + (" | change |" if len(columns) == 2 else " |"),
             "|---|" + "---|" * (len(columns) + (len(columns) == 2))]
    for key in SUMMARY_KEYS:
        if all(key in r for _, r in columns):
            values = [r[key] for _, r in columns]
            change = f" | {values[1] - values[0]:+.4f}" if len(values) == 2 else ""
            lines.append(f"| {key} | " + " | ".join(f"{v:.4f}" for v in values) + change + " |")
    per_class = [(t, r.get("per_class_iou")) for t, r in columns]
    if all(isinstance(v, (list, tuple)) for _, v in per_class):
        for i, name in enumerate(names):
            values = [v[i] for _, v in per_class]
            text = ["n/a" if v is None or v != v else f"{v:.4f}" for v in values]
            change = (f" | {values[1] - values[0]:+.4f}" if len(values) == 2 and None not in values
                      and values[0] == values[0] and values[1] == values[1] else (" | " if len(values) == 2 else ""))
            lines.append(f"| IoU {name} | " + " | ".join(text) + change + " |")
    return "\n".join(lines)


def card(metadata: dict, names, palette, checkpoint: dict | None, export: dict | None, source: str | None,
         gradcam: str | None, confusion: bool) -> str:
    """The model card's Markdown."""
    inputs = metadata["signatures"]["serving_default"]["inputs"]["images"]
    shape = ", ".join("B" if i == 0 and v is None else ("any" if v is None else str(v))
                      for i, v in enumerate(inputs["shape"]))
    norm = metadata.get("normalization", {})
    fmt = {"saved_model": "TF SavedModel", "tflite": "TFLite", "onnx": "ONNX"}.get(metadata["format"], metadata["format"])
    if metadata["format"] == "tflite":
        fmt += f" ({metadata.get('quantize') or 'float32'})"
    elif metadata["format"] == "onnx":
        fmt += f" (opset {metadata.get('opset')})"
    lines = [
        f"# Model card: {metadata.get('model')} on {metadata.get('dataset')}",
        "",
        f"{fmt} export of checkpoint `{os.path.basename(metadata.get('checkpoint', ''))}` (step "
        f"{metadata.get('step')}) of the run `{metadata.get('model_dir')}`.",
        "",
        "## Classes",
        "",
        "| index | class | colour |",
        "|---|---|---|",
        *[f"| {i} | {name} | `#{int(c[0]):02x}{int(c[1]):02x}{int(c[2]):02x}` |"
          for i, (name, c) in enumerate(zip(names, palette))],
        "",
        "## Training",
        "",
        f"- dataset: `{metadata.get('dataset')}`, split `{metadata.get('train_split')}`",
        f"- model: `{metadata.get('model')}`, precision `{metadata.get('precision')}`",
        f"- steps: {metadata.get('step')}",
        f"- run directory: `{metadata.get('model_dir')}` (its `operative_config.gin` holds every setting)",
        "",
        "## Evaluation",
        "",
    ]
    if checkpoint is None and export is None:
        lines += ["Not evaluated: this checkpoint has no evaluation in its run. Export with "
                  "`--evaluate_split=SPLIT` to evaluate the checkpoint and the export here.", ""]
    else:
        lines += [f"On {source}" + (" (the export as a client runs it: uint8 images in)" if export else "") + ":", "",
                  _table(checkpoint, export, names), ""]
        if confusion:
            lines += ["The export's confusion matrix (rows: true class, normalised):", "",
                      f"![confusion matrix]({run_dir.CONFUSION_PICTURE})", ""]
    if gradcam:
        lines += ["## What the model looks at", "", gradcam, ""]
        if gradcam.startswith("Grad-CAM of"):
            lines += [f"![Grad-CAM]({GRADCAM_PICTURE})", ""]
    outputs = ", ".join(f"`{n}` {o['dtype']} [{', '.join('B' if i == 0 else ('any' if v is None else str(v)) for i, v in enumerate(o['shape']))}]"
                        for n, o in metadata["outputs"].items())
    lines += [
        "## Input contract",
        "",
        f"- input `images`: uint8 RGB [{shape}] (channels last)"
        + (f"; images of another size are resized to {metadata['image_size'][0]}x{metadata['image_size'][1]} "
           f"and the outputs resized back" if metadata.get("image_size") else "; any height and width"),
        f"- outputs: {outputs}",
        f"- normalisation inside the model: mean {norm.get('mean')}, std {norm.get('std')}"
        + (", channels reversed to BGR" if norm.get("bgr") else "") + " (on the 0-255 scale)",
        f"- runtime: {metadata.get('runtime', 'TensorFlow (tf.saved_model.load) or TF Serving')}",
    ]
    check = metadata.get("check")
    if check:
        lines.append(f"- checked at export against the checkpoint on {check['images']} image(s) of split "
                     f"'{check.get('split')}': labels agree "
                     f"on {100 * check['label_agreement']:.2f}% of pixels, logits differ by at most "
                     f"{check['max_logit_difference']:.3g}")
    lines += ["", "## Made by", "", "```", metadata.get("command", "segtrain export"), "```", ""]
    return "\n".join(lines)
