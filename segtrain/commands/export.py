"""`segtrain export`: a trained run as a TF SavedModel, a TFLite flat buffer or an ONNX model.

The run is rebuilt by segtrain.commands.trained_run (weights only, no optimizer); segtrain.export
converts and writes it. The model's inference settings (gin ``inference.*``: sliding window,
scales, flips) are those `segtrain predict` uses. Each export directory holds the model,
``segtrain_export.json`` and ``MODEL_CARD.md``; with ``--evaluate_split`` the checkpoint and the
export are both evaluated on that split first, so the card shows what the conversion cost.
Before an export lands it is loaded in its own runtime and compared with the checkpoint on
the first images of the run's evaluation split (recorded as ``check`` in segtrain_export.json). In a multi-worker
cluster (TF_CONFIG or SLURM) only the chief writes; the other tasks return at once.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Sequence

import numpy as np
from absl import flags

import gin
from segtrain.commands import model_card
from segtrain.commands.common_flags import bindings, own_flags, trained_run_flags, verbosity_flag
from segtrain.commands.trained_run import calibrated_binding, parse_run, restored
from segtrain.errors import SegtrainError, data_errors
from segtrain.export import METADATA_FILE, check_output, export_model, output_names
from segtrain.export.runtime import FORMATS, Exported, load, resize_images
from segtrain.export.tflite import QUANTIZATIONS
from segtrain.io import write_json
from segtrain.runtime.cluster import detect_cluster

CHECK_IMAGES = 4  # images of the run's split the export is compared with the checkpoint on before it lands
# A float export whose labels agree with the checkpoint on fewer pixels than this is a broken conversion.
FLOAT_AGREEMENT = 0.995


def run(model_dir: str | None, gin_files: Sequence[str], gin_params: Sequence[str], flags: dict) -> int:
    """Parses ``model_dir``'s operative config (then ``gin_files`` and ``gin_params``) and exports.

    Args:
      flags: the flags given on the command line; they win over gin.
    """
    flags = dict(flags)
    calibrated = [calibrated_binding(model_dir)] if flags.pop("calibrated", False) else []
    parse_run(model_dir, gin_files, [*gin_params, *bindings("export", flags), *calibrated])  # a flag given wins
    export(model_dir)
    return 0


@gin.configurable("export", denylist=["model_dir"])
def export(model_dir: str, output: str | None = None, checkpoint: str = "best", probabilities: bool = False,
           overwrite: bool = False, format: str = "saved_model", quantize: str | None = None,
           image_size: Sequence[int] | None = None, calibration_images: int = 100, opset: int | None = None,
           evaluate_split: str | None = None) -> str | None:
    """Writes a trained run's model as an export of ``format``, with its metadata and model card.

    Args:
      model_dir: the run's directory.
      output: the export directory to write (for TF Serving: a numbered version directory,
        e.g. runs/quickstart/segtrain_model/1).
      checkpoint: 'best' (falls back to the latest when no best was kept), 'latest', or one by name
        ('ckpt-600', 'best/ckpt-400') or path.
      probabilities: the outputs also hold softmax 'probabilities'.
      overwrite: replace an existing ``output`` (only once the new export is complete).
      format: 'saved_model' (TF Serving, tf.saved_model.load), 'tflite' (LiteRT: phones, edge
        devices) or 'onnx' (ONNX Runtime, TensorRT).
      quantize: TFLite only: 'float16', 'dynamic' (int8 weights) or 'int8' (weights and
        activations; calibrated on the training split); default float32.
      image_size: TFLite only: the (height, width) the flat buffer takes (default: the training
        crop, pipeline.crop_size).
      calibration_images: TFLite int8: how many training images calibrate the ranges (the first
        ones of the training split, in order: the same export every time).
      opset: ONNX only: the ONNX opset (default 17).
      evaluate_split: evaluate the checkpoint and the export on this split; both tables go into
        the model card, the export's results next to it.

    Returns:
      The export's path, or None on a task of a cluster that is not the chief.

    Raises:
      SegtrainError: a bad flag, an existing output without --overwrite, no checkpoint, a model
        the format cannot take (naming the layer).
    """
    cluster = detect_cluster()
    if cluster is not None and not cluster.is_chief:
        print(f"This is {cluster.task_type} {cluster.task_id} of a {cluster.num_tasks}-task cluster "
              f"({cluster.source}): the chief writes the export, so this task writes nothing.")
        return None
    _check_flags(format, quantize, image_size, calibration_images, opset)
    check_output(output, overwrite)  # before the model is built: a refusal costs nothing
    try:
        precision = gin.query_parameter("train.precision")
    except ValueError:  # not bound: the default
        precision = "float32"
    if format != "saved_model" and precision != "float32":
        # A mixed-precision run's weights are float32; TFLite and ONNX models compute in float32
        # (TFLite's own float16 is --quantize=float16), so the model is built at float32.
        gin.bind_parameter("train.precision", "float32")
    experiment, path, step = restored(model_dir, checkpoint)
    info = experiment.info
    inference = experiment.inference()
    if format == "tflite":
        image_size = _image_size(image_size, experiment)
    what = _describe(format, quantize, image_size)
    print(f"Exporting {os.path.basename(path)} (step {step}) of {model_dir} as {what}")
    metadata = {
        "class_names": list(info.class_names),
        "palette": [[int(c) for c in colour] for colour in info.palette],
        "ignore_label": int(info.ignore_label),
        "dataset": info.name or experiment.config.dataset,
        "model": experiment.config.model,
        "precision": experiment.config.precision,
        "trained_precision": precision,
        "model_dir": os.path.abspath(model_dir),
        "checkpoint": os.path.abspath(path),
        "step": step,
        "train_split": experiment.config.train_split,
        "command": _command(model_dir, output, checkpoint, probabilities, overwrite, format, quantize, image_size,
                            calibration_images, opset, evaluate_split),
    }
    metadata["inference"] = dataclasses.asdict(inference.options)
    # The check reads the split the run's facts come from (its evaluation split), which every
    # command that uses a trained model reads anyway; only int8 calibration needs the training split.
    samples = _first_images(experiment, experiment.split, CHECK_IMAGES, image_size)
    calibration = None
    if quantize == "int8":
        train_split = experiment.config.train_split
        calibrating = _first_images(experiment, train_split, calibration_images, image_size)
        calibration = lambda: iter(calibrating)  # noqa: E731
        print(f"Calibrating int8 ranges on the first {len(calibrating)} images of split '{train_split}'")

    def finish(staging: str, serve) -> None:  # serve: the checkpoint's own serving function, traced
        exported = load(staging)
        check = {**_check(exported, serve, samples, format, quantize), "split": experiment.split}
        exported.metadata["check"] = check
        write_json(os.path.join(staging, METADATA_FILE), exported.metadata)
        model_card.write(staging, exported, experiment, inference, path, step, evaluate_split)

    written = export_model(output, experiment.model, inference.logits, experiment.normalization, info.num_classes,
                           experiment.facts.size_divisor, probabilities, metadata, overwrite, format=format,
                           quantize=quantize, image_size=image_size, calibration=calibration, opset=opset,
                           finish=finish, task=inference.task, channels=info.channels,
                           image_dtype=info.image_dtype)
    print(f"Wrote {written} ({what}; outputs: {', '.join(output_names(probabilities))}; labels explained in "
          f"{METADATA_FILE}, model card in {model_card.CARD_FILE})." + _hint(format, written))
    return written


def _check_flags(format, quantize, image_size, calibration_images, opset) -> None:
    if format not in FORMATS:
        raise SegtrainError(f"--format={format}: choose one of {', '.join(FORMATS)}.")
    if quantize is not None and format != "tflite":
        raise SegtrainError(f"--quantize={quantize} is for --format=tflite; a {format} export is float32.")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise SegtrainError(f"--quantize={quantize}: choose one of {', '.join(QUANTIZATIONS)} (or leave it out "
                            f"for float32).")
    if image_size is not None and format != "tflite":
        raise SegtrainError(f"--image_size is for --format=tflite (a fixed input size); a {format} export takes "
                            f"any size.")
    if image_size is not None and (len(image_size) != 2 or min(int(v) for v in image_size) < 1):
        raise SegtrainError(f"--image_size={','.join(str(v) for v in image_size)}: give H,W, e.g. --image_size=64,64.")
    if opset is not None and format != "onnx":
        raise SegtrainError(f"--opset is for --format=onnx, not --format={format}.")
    if calibration_images < 1:
        raise SegtrainError(f"--calibration_images={calibration_images}: use an integer >= 1.")


def _image_size(image_size, experiment) -> tuple[int, int]:
    """--image_size, else the training crop (or resize) size; a multiple of the model's size divisor."""
    if image_size is None:
        config = experiment.pipeline_config
        image_size = config.crop_size or config.resize
        if image_size is None:
            raise SegtrainError("--format=tflite takes one input size: give --image_size=H,W (the run sets neither "
                                "pipeline.crop_size nor pipeline.resize).")
    return tuple(int(v) for v in image_size)


def _describe(format, quantize, image_size) -> str:
    if format == "tflite":
        return f"TFLite {quantize or 'float32'} at {image_size[0]}x{image_size[1]}"
    return {"saved_model": "a TF SavedModel", "onnx": "ONNX"}[format]


def _command(model_dir, output, checkpoint, probabilities, overwrite, format, quantize, image_size,
             calibration_images, opset, evaluate_split) -> str:
    """The `segtrain export` command line that makes this export again."""
    words = ["segtrain", "export", f"--model_dir={model_dir}", f"--output={output}", f"--format={format}"]
    if checkpoint != "best":
        words.append(f"--checkpoint={checkpoint}")
    if quantize:
        words.append(f"--quantize={quantize}")
    if format == "tflite":
        words.append(f"--image_size={image_size[0]},{image_size[1]}")
    if quantize == "int8":
        words.append(f"--calibration_images={calibration_images}")
    if opset:
        words.append(f"--opset={opset}")
    if probabilities:
        words.append("--probabilities")
    if evaluate_split:
        words.append(f"--evaluate_split={evaluate_split}")
    return shlex.join(words)


def _first_images(experiment, split: str, count: int, image_size) -> list[np.ndarray]:
    """The first ``count`` images of ``split``, in order, as uint8 [H,W,3] (at ``image_size`` when
    given): the export's check, and int8 calibration."""
    out = []
    with data_errors(lambda e: experiment.damaged_data(e, [split])):
        for batch in experiment.eval_dataset(split, batch_size=1):
            h, w = (int(v) for v in batch["image_size"][0])
            image = experiment.normalization.invert(batch["image"][0, :h, :w])
            out.append(resize_images(image[np.newaxis], image_size)[0] if image_size else image)
            if len(out) >= count:
                break
    if not out:
        raise SegtrainError(f"Split '{split}' has no image: the export is checked (or int8 calibrated) on it.")
    return out


def _check(exported: Exported, serve, images: list[np.ndarray], format, quantize) -> dict:
    """The export against the checkpoint on ``images``, one by one and the first two as one batch:
    the largest logit difference and the share of pixels whose label agrees. An export its
    runtime cannot run, or a float export that disagrees, is refused."""
    worst, agree, total = 0.0, 0, 0
    batches = [image[np.newaxis] for image in images]
    if len(images) > 1:
        batches.append(np.stack([images[0], images[0]]))  # a batch: runtimes have failed only there
    for batch in batches:
        reference = {k: v.numpy() for k, v in serve(batch).items()}
        try:
            got = exported(batch)
        except Exception as e:  # the runtime's own error types
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
            raise SegtrainError(f"--format={format}: the converted model fails in its runtime on a batch of "
                                f"{len(batch)} image(s): {reason}; nothing was written.") from None
        worst = max(worst, float(np.max(np.abs(got["logits"] - reference["logits"]))))
        agree += int(np.sum(got["labels"] == reference["labels"]))
        total += int(reference["labels"].size)
    check = {"images": len(images), "max_logit_difference": worst, "label_agreement": agree / total}
    print(f"Checked the export against the checkpoint on {len(images)} image(s): labels agree on "
          f"{100 * agree / total:.2f}% of pixels, logits differ by at most {worst:.3g}")
    if quantize is None and agree / total < FLOAT_AGREEMENT:
        raise SegtrainError(f"--format={format}: the converted model's labels agree with the checkpoint's on only "
                            f"{100 * agree / total:.2f}% of pixels (logits differ by up to {worst:.3g}): the "
                            f"conversion is wrong for this model; nothing was written.")
    return check


def _hint(format, written) -> str:
    if format == "saved_model":
        return f" Inspect it with `saved_model_cli show --dir {written} --all`."
    return f" Evaluate it with `segtrain evaluate --export={written}`."


def define_flags(fv):
    trained_run_flags(fv, "export")
    flags.DEFINE_string("output", None, "The export directory to write (it holds the model, segtrain_export.json "
                        "and MODEL_CARD.md).", flag_values=fv)
    flags.DEFINE_enum("format", None, list(FORMATS), "saved_model (default; TF Serving), tflite (LiteRT: phones, "
                      "edge devices; one input size) or onnx (ONNX Runtime, TensorRT).", flag_values=fv)
    flags.DEFINE_enum("quantize", None, list(QUANTIZATIONS), "TFLite only: float16 weights, dynamic (int8 weights) "
                      "or int8 (weights and activations, calibrated on the training split). Default: float32.",
                      flag_values=fv)
    flags.DEFINE_list("image_size", None, "TFLite only: the input size H,W (default: the training crop).",
                      flag_values=fv)
    flags.DEFINE_integer("calibration_images", None, "--quantize=int8: how many training images calibrate the "
                         "ranges (the first ones, in order; default 100).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("opset", None, "ONNX only: the opset (default 17).", lower_bound=7, flag_values=fv)
    flags.DEFINE_string("evaluate_split", None, "Evaluate the checkpoint and the export on this split; the model "
                        "card shows both tables.", flag_values=fv)
    flags.DEFINE_bool("probabilities", False, "Also return softmax 'probabilities'.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing --output directory.", flag_values=fv)
    verbosity_flag(fv)
    flags.DEFINE_bool("calibrated", False, "Probabilities with the temperature `segtrain evaluate --calibrate` fitted "
                      "for the run (its calibration.json; gin: inference.temperature).", flag_values=fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain export` from its parsed flags: each flag given is a gin binding of ``export.*``."""
    return run(fv.model_dir, fv.gin_file, fv.gin_param, own_flags(fv))
