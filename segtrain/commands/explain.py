"""`segtrain explain`: Grad-CAM heat maps of one class of a trained run on your images.

For each image it writes, under ``--output`` (default ``MODEL_DIR/explain``):

    <stem>_<class>_gradcam.png        the heat map (a jet-like colour ramp) blended over the image
    <stem>_<class>_gradcam.npy        the map itself: float32 [H,W] in [0,1]
    <stem>_<layer>_activations.png    with --activations: the layer's channels as a grid

and the same pictures as TensorBoard image summaries under ``<output>/tensorboard`` (at the
checkpoint's step). The algorithm, the default layer and the grid are described in
segtrain.explain. The run is rebuilt by segtrain.commands.trained_run: no optimizer is built and no
dataset split is read.
"""
from __future__ import annotations

import io
import os
import re
import sys
from typing import Sequence

import gin
import numpy as np
import tensorflow as tf
from absl import flags

from segtrain import explain as gradcam
from segtrain import run_dir
from segtrain.commands.common_flags import bindings, input_flag, own_flags, trained_run_flags, verbosity_flag
from segtrain.commands.trained_run import parse_run, restored
from segtrain.errors import SegtrainError
from segtrain.images import list_inputs, read_image, write_image
from segtrain.io import atomic_write_bytes
from segtrain.progress import Progress, end_line
from segtrain.train.summaries import file_writer


def run(model_dir: str | None, gin_files: Sequence[str], gin_params: Sequence[str], flags: dict) -> int:
    """Parses ``model_dir``'s operative config (then ``gin_files`` and ``gin_params``) and explains.

    Args:
      flags: input, output, class, layer, box, activations and checkpoint given on the command
        line; they win over gin.
    """
    parse_run(model_dir, gin_files, [*gin_params, *bindings("explain", flags, rename={"class": "class_name"})])
    explain(model_dir)
    return 0


@gin.configurable("explain", denylist=["model_dir"])
def explain(
    model_dir: str,
    input: str | Sequence[str] | None = None,  # noqa: A002 (the flag's name)
    class_name: str | None = None,
    layer: str | None = None,
    box: Sequence[str] | None = None,
    activations: bool = False,
    output: str | None = None,
    checkpoint: str = "best",
) -> list[dict]:
    """Writes the Grad-CAM of ``class_name`` on every input image (see the module doc).

    Args:
      model_dir: the run's directory.
      input: image files, directories or glob patterns (comma-separated or a list).
      class_name: the class to explain, by name or index.
      layer: the layer whose activations are weighed (default: the model's cam_layer, its
        deepest encoder stage); 'list' prints the layers and their output shapes and stops.
      box: Y0,X0,Y1,X1 pixels (Y1, X1 excluded): the target is the class's logits in this box
        instead of over the pixels predicted as the class.
      activations: also write the layer's channels as a grid.
      output: the directory written to (default: model_dir/explain).
      checkpoint: 'best' (the latest when no best was kept), 'latest', or one by name ('ckpt-600')
        or path.

    Returns:
      One record per image explained: image, files written, region pixels, empty.

    Raises:
      SegtrainError: an unknown class or layer, a bad box, no input, or no readable image.
    """
    experiment, path, step = restored(model_dir, checkpoint)
    model = experiment.model
    if layer == gradcam.LIST:
        print(format_layers(model))
        return []
    if class_name is None:
        raise SegtrainError("--class is required: the class to explain, by name or index "
                            f"({', '.join(experiment.info.class_names)}).")
    class_id = gradcam.class_index(class_name, experiment.info.class_names)
    name = experiment.info.class_names[class_id]
    region_box = gradcam.parse_box(box)
    paths = list_inputs(input or "")
    cam = gradcam.GradCam(model, layer, task=experiment.task)
    output = output or os.path.join(model_dir, run_dir.EXPLAIN_DIR)
    os.makedirs(output, exist_ok=True)
    print(f"Grad-CAM of class '{name}' at layer {cam.layer} ({os.path.basename(path)}, step {step}) "
          f"on {len(paths)} image(s) -> {output}")
    records, skipped = [], []
    info = experiment.info
    progress = Progress("explain", len(paths), unit="image")
    with _Summaries(os.path.join(output, "tensorboard"), step) as summaries:
        for done, image_path in enumerate(paths, start=1):
            try:
                pixels = read_image(image_path, info.channels, info.image_dtype)
            except SegtrainError as e:
                end_line()
                print(f"skipped {e}", file=sys.stderr)
                skipped.append(image_path)
            else:
                normalised = experiment.normalization(pixels).numpy()
                result = cam(normalised, class_id, region_box)
                record = _write(output, image_path, experiment.normalization.display(normalised), result, name,
                                cam.layer, activations, summaries)
                end_line()
                print(_describe(image_path, record, name, region_box))
                records.append(record)
            progress.update(done)
    progress.close()
    if not records:
        raise SegtrainError(f"--input: none of the {len(paths)} image(s) could be read.")
    print(f"Explained {len(records)} image(s)" + (f", skipped {len(skipped)} unreadable" if skipped else "")
          + f"; wrote {output}")
    return records


def format_layers(model) -> str:
    """The model's layers and their output shapes, one a line, the default layer marked with '*'."""
    shapes = gradcam.layer_shapes(model)
    default = gradcam.choose_layer(model)
    side = "x".join(str(s) for s in gradcam.reference_shape(model)[1:3])
    width = max(len(n) for n in shapes)
    lines = [f"Layers of {model.name} and their output shapes for one {side} image ('*': the default --layer; "
             f"Grad-CAM takes any rank-4 output):"]
    lines += [f"{'*' if n == default else ' '} {n:<{width}}  {shape}" for n, shape in shapes.items()]
    return "\n".join(lines)


def _safe(text: str) -> str:
    """``text`` fit for a file name: anything but letters, digits, '.', '_' and '-' becomes '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _write(output, image_path, pixels, result, class_name, layer, activations, summaries) -> dict:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    base = os.path.join(output, f"{_safe(stem)}_{_safe(class_name)}_gradcam")
    picture = gradcam.overlay(pixels, result.cam)
    write_image(base + ".png", picture)
    buffer = io.BytesIO()
    np.save(buffer, result.cam.astype(np.float32))
    atomic_write_bytes(base + ".npy", buffer.getvalue())
    files = [base + ".png", base + ".npy"]
    summaries.image(f"{stem}/gradcam_{class_name}", picture)
    if activations:
        grid = gradcam.activation_grid(result.activations)
        grid_path = os.path.join(output, f"{_safe(stem)}_{_safe(layer)}_activations.png")
        write_image(grid_path, grid)
        files.append(grid_path)
        summaries.image(f"{stem}/activations_{layer}", grid)
    return {"image": image_path, "files": files, "region_pixels": result.region_pixels,
            "empty": not result.cam.any()}


def _describe(image_path: str, record: dict, class_name: str, box) -> str:
    """The output line of one image; it says when the map is all zeros, and why."""
    written = ", ".join(os.path.basename(f) for f in record["files"])
    if record["region_pixels"] == 0:
        why = ("the box lies outside the image" if box else f"'{class_name}' is predicted nowhere")
        return f"{image_path}: {why}, so the map is all zeros; wrote {written}"
    where = "in the box" if box else "predicted"
    note = " (all zeros: no positive evidence at this layer)" if record["empty"] else ""
    pixels = record["region_pixels"]
    return f"{image_path}: '{class_name}' {where} on {pixels} pixel{'s' * (pixels != 1)}{note}; wrote {written}"


class _Summaries:
    """TensorBoard image summaries of the pictures written, at the checkpoint's step."""

    def __init__(self, logdir: str, step: int):
        self.logdir, self.step = logdir, step

    def __enter__(self):
        self.writer = file_writer(self.logdir)
        return self

    def image(self, tag: str, pixels: np.ndarray) -> None:
        with self.writer.as_default():
            tf.summary.image(_safe_tag(tag), pixels[np.newaxis], step=self.step)

    def __exit__(self, *exc):
        self.writer.close()
        return False


def _safe_tag(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9._/-]+", "_", tag)


def define_flags(fv):
    trained_run_flags(fv, "explain")
    input_flag(fv)
    flags.DEFINE_string("output", None, "Directory the heat-map overlays are written to (default: "
                        "MODEL_DIR/explain).", flag_values=fv)
    flags.DEFINE_string("class", None, "The class to explain, by name (or index).", flag_values=fv)
    flags.DEFINE_string("layer", None, "The layer whose activations are weighed (default: the model's deepest "
                        "encoder stage; `--layer=list` lists the layers).", flag_values=fv)
    flags.DEFINE_list("box", None, "Explain the class's logits in this box Y0,X0,Y1,X1 (pixels) instead of the "
                      "pixels predicted as the class.", flag_values=fv)
    flags.DEFINE_bool("activations", False, "Also write a grid of --layer's channels.", flag_values=fv)
    verbosity_flag(fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain explain` from its parsed flags: each flag given is a gin binding of ``explain.*``."""
    return run(fv.model_dir, fv.gin_file, fv.gin_param, own_flags(fv))
