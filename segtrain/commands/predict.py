"""`segtrain predict`: a trained run's model on your own images.

For every input image (any size; JPEG, PNG, grey and RGBA converted to RGB) it writes, in the
output directory:

- ``<name>.png``: the class index of each pixel (an 8-bit single-channel PNG);
- for a multi-label (or binary) model, ``<name>.png`` holds the labels predicted at each pixel
  as bits (label i: ``(value >> i) & 1``), and ``<name>_<label>.png`` one mask per label (255
  where the label's probability exceeds ``inference.threshold``, else 0);
- ``<name>_color.png``: the classes in the dataset's palette (multi-label: the mean colour of
  the labels present);
- ``<name>_overlay.jpg``: the colours over the image (an image of other bands than 8-bit RGB:
  over the bands ``overlay_channels`` names, stretched by the training data's mean and std);
- with ``--probabilities``, ``<name>_probabilities.npy``: float32 [H,W,C] class probabilities;
- with an instance post-processor (``--postprocess=watershed_instances``),
  ``<name>_instances_<class>.png``: a 16-bit PNG of instance ids (0: none) per class.

An image with more pixels than ``large_image_pixels`` (default 16 million) is read, inferred
and written tile by tile (``segtrain.tiles``): its mask is ``<name>.tif``, a tiled BigTIFF of
class ids whose colour map is the palette (no colour PNG or overlay), and ``--probabilities``
writes the .npy through a memory map; memory holds one tile's logits and a batch of sliding
windows, not the image. TIFF inputs are read region by region (tifffile).

Images of one size are inferred together in batches. An unreadable file is reported by name
and skipped (``--strict``: stops); every file is written through a temporary file and a rename,
and an image's files are written only once all of them are computed, so the output directory
never holds part of a result. ``predictions.json`` lists what was written and what was skipped.
"""

from __future__ import annotations

import collections
import io
import os
import time
from typing import Sequence

import gin
import numpy as np
import tensorflow as tf
from absl import flags

from segtrain import images, tiles
from segtrain.commands.common_flags import (bindings, inference_flags, input_flag, own_flags, trained_run_flags,
                                             verbosity_flag)
from segtrain.commands.evaluate import postprocessor_for
from segtrain.commands.trained_run import calibrated_binding, parse_run, restored
from segtrain.data.info import DatasetInfo
from segtrain.errors import SegtrainError
from segtrain.io import atomic_write_bytes, write_json
from segtrain.progress import Progress
from segtrain.task import unpack_np


SUMMARY_FILE = "predictions.json"
# The sliding windows of large images predicted with an export that takes any size.
EXPORT_WINDOW = (512, 512)


def run(model_dir: str | None, gin_files: Sequence[str], gin_params: Sequence[str], flags: dict) -> int:
    flags = dict(flags)
    calibrated = flags.pop("calibrated", False)
    params = [*gin_params, *bindings("predict", flags)]  # a flag given wins
    if calibrated and model_dir is None and flags.get("export"):
        raise SegtrainError("--calibrated applies a run's fitted temperature to its checkpoint: an export keeps the "
                            "temperature it was exported with (export with --calibrated).")
    if calibrated:
        params.append(calibrated_binding(model_dir))
    if model_dir is None and flags.get("export"):
        # An export holds all predict needs (class names, palette, the model): no run is read.
        from segtrain import config

        config.parse(gin_files, params)
    else:
        parse_run(model_dir, gin_files, params)
    predict(model_dir)
    return 0


def output_names(paths: Sequence[str]) -> dict[str, str]:
    """{input path: output name}: the file's stem, made unique with its parent directories' names."""
    names, taken = {}, collections.Counter(os.path.splitext(os.path.basename(p))[0] for p in paths)
    used = set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name = stem
        if taken[stem] > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
            name = f"{parent}_{stem}"
        base, n = name, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        names[path] = name
    return names


@gin.configurable("predict", denylist=["model_dir"])
def predict(model_dir: str, input: str | Sequence[str] | None = None, output: str | None = None,  # noqa: A002
            checkpoint: str = "best", probabilities: bool = False, strict: bool = False, batch_size: int = 4,
            mode: str | None = None, crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None,
            scales: Sequence[float] | None = None, flip: bool | None = None, postprocess: str | None = None,
            overlay_alpha: float = 0.5, export: str | None = None, large_image_pixels: int = 16_000_000,
            tile_size: int = 1024, overlay_channels: Sequence[int] | None = None) -> dict:
    """Segments every image of ``input`` into ``output``.

    Args:
      model_dir: the run's directory.
      input: image files, directories and glob patterns (comma-separated or a list).
      output: the directory the results are written to (made if missing).
      checkpoint: 'best', 'latest', or one by name ('ckpt-600', 'best/ckpt-400') or path.
      probabilities: also write the class probabilities as .npy.
      strict: stop at the first unreadable image instead of skipping it.
      batch_size: images of one size inferred together.
      mode, crop_size, stride, scales, flip: how the model runs (default: gin's inference.*).
      postprocess: a registered post-processor: a refiner (dense_crf) changes the masks, an
        instance maker (watershed_instances) adds instance PNGs.
      overlay_alpha: weight of the class colours in the overlay.
      export: predict with this export (a directory `segtrain export` wrote, or its model file)
        in its own runtime instead of a checkpoint; ``model_dir`` may then be None.
      large_image_pixels: images with more pixels are inferred and written tile by tile, by
        sliding windows (the run's --mode=slide windows, or its training crop every two thirds
        of it; with an export, a TFLite export's input size or 512x512), into a tiled TIFF;
        0 sends every image that way (those smaller than one window excepted).
      tile_size: the edge of those output tiles (a multiple of 16); one tile's logits are held.
      overlay_channels: a model of other bands than 8-bit RGB: the bands the overlay shows, three
        (as red, green, blue) or one (grey), 0-based; default: the first three, or the first.

    Returns:
      The summary written to ``output``/predictions.json.
    """
    if not output:
        raise SegtrainError("--output is required: the directory the masks are written to.")
    if batch_size < 1:
        raise SegtrainError(f"--batch_size={batch_size}: use an integer >= 1.")
    if tile_size < 16 or tile_size % 16:
        raise SegtrainError(f"predict.tile_size={tile_size}: use a multiple of 16 (TIFF tiles), e.g. 1024.")
    paths = images.list_inputs(input or "")
    processor = postprocessor_for(postprocess, refine=False)
    if export:
        refused = [k for k, v in {"--mode": mode, "--crop_size": crop_size, "--stride": stride, "--scales": scales,
                                  "--flip": flip}.items() if v is not None]
        if refused:
            raise SegtrainError(f"{', '.join(refused)}: an export runs as it was exported (its inference settings are "
                                f"inside it); predict with the checkpoint for other settings, or export again.")
        from segtrain.export.runtime import load

        exported = load(export)
        task = exported.task
        info = DatasetInfo(task.num_classes, task.ignore_label, tuple(exported.metadata["class_names"]),
                           tuple(tuple(c) for c in exported.metadata["palette"]), multilabel=task.multilabel,
                           channels=exported.channels, image_dtype=exported.image_dtype)
        palette = info.palette_array()
        stats = exported.metadata.get("normalization", {})
        shown = (stats.get("mean"), stats.get("std"))
        checkpoint_path, step = exported.path, exported.metadata.get("step", -1)
        described = exported.describe()
        model_dir = model_dir or exported.metadata.get("model_dir")

        def run_batch(x):
            return task.probabilities(exported.logits(x.numpy()))

        def window_logits(x):
            return np.asarray(exported.logits(x), np.float32)

        window = (exported.metadata.get("image_size") or EXPORT_WINDOW, None)
    else:
        experiment, checkpoint_path, step = restored(model_dir, checkpoint)
        info, normalization = experiment.info, experiment.normalization
        inference = experiment.inference(mode=mode, crop_size=crop_size, stride=stride, scales=scales, flip=flip)
        task = inference.task
        palette = info.palette_array()
        shown = (normalization.mean, normalization.std)
        described = inference.options.describe()
        run_batch = tf.function(lambda x: inference.probabilities(normalization(x)), reduce_retracing=True)
        whole = experiment.inference(mode="whole", scales=(1.0,), flip=False)
        window_fn = tf.function(lambda x: whole.logits(normalization(x)), reduce_retracing=True)

        def window_logits(x):
            return window_fn(tf.constant(x)).numpy()

        options = inference.options
        window = ((options.crop_size, options.stride) if options.mode == "slide"
                  else (experiment.pipeline_config.crop_size, None))
        if inference.options.augmented:
            window_logits = None  # test-time augmentation is per image: refused for large ones below

    if processor is not None and not info.rgb:
        raise SegtrainError(f"--postprocess={postprocess}: the post-processors look at RGB images; this model takes "
                            f"{info.channels} band(s) of {info.image_dtype}. Predict without --postprocess.")
    if processor is not None and task.multilabel:
        raise SegtrainError(f"--postprocess={postprocess}: the post-processors work on one class per pixel (a softmax); "
                            f"this model is multi-label. Predict without --postprocess.")
    skipped: dict[str, str] = {}

    def skip(path, reason):
        if strict:
            raise SegtrainError(f"{reason} (--strict stops at the first bad image; leave it out to skip such files).")
        print(f"warning: skipping {reason}")
        skipped[path] = reason

    sizes: dict[tuple[int, int], list[str]] = {}
    large: dict[str, tuple[int, int]] = {}
    for path in paths:
        size = tiles.image_size(path)
        if size is None:
            skip(path, f"{path}: not a readable image.")
        elif size[0] * size[1] > large_image_pixels:
            large[path] = size
        else:
            sizes.setdefault(size, []).append(path)
    crop, stride = _large_windows(*window) if large else (None, None)
    for path, size in list(large.items()):
        if size[0] < crop[0] or size[1] < crop[1]:  # smaller than one window: inferred whole
            sizes.setdefault(large.pop(path), []).append(path)
    if large:
        reasons = [r for r, bad in (("test-time augmentation (--scales/--flip)", window_logits is None),
                                    (f"--postprocess={postprocess}", processor is not None),
                                    (f"images of {info.channels} band(s) of {info.image_dtype}", not info.rgb)) if bad]
        if reasons:
            raise SegtrainError(
                f"{len(large)} image(s) have more than predict.large_image_pixels={large_image_pixels} pixels "
                f"(e.g. {next(iter(large))}) and are predicted tile by tile, which does not support "
                f"{' or '.join(reasons)}: leave it out for these images.")
    os.makedirs(output, exist_ok=True)
    names = output_names(paths)
    print(f"Predicting {len(paths) - len(skipped)} images with {os.path.basename(checkpoint_path)} (step {step}) "
          f"of {model_dir}: {described}" + (f", then {postprocess}" if postprocess else ""))
    progress = Progress("predict", sum(len(group) for group in sizes.values()), unit="image")
    written: dict[str, list[str]] = {}
    done, t0 = 0, time.perf_counter()
    for group in sizes.values():
        for start in range(0, len(group), batch_size):
            batch_paths, pixels = [], []
            for path in group[start:start + batch_size]:
                try:
                    pixels.append(images.read_image(path, info.channels, info.image_dtype))
                    batch_paths.append(path)
                except SegtrainError as e:
                    skip(path, str(e))
            if not pixels:
                continue
            probs = run_batch(tf.constant(np.stack(pixels))).numpy()
            for path, image, p in zip(batch_paths, pixels, probs):
                shown_image = image if info.rgb else images.display(image, *shown, overlay_channels)
                files = _results(image, shown_image, p, names[path], info, palette, processor, probabilities,
                                 overlay_alpha, task)
                for file_name, data in files.items():
                    atomic_write_bytes(os.path.join(output, file_name), data)
                written[path] = sorted(files)
            done += len(batch_paths)
            progress.update(done, done / max(time.perf_counter() - t0, 1e-9))
    progress.close()
    for path, (height, width) in large.items():
        try:
            written[path] = _predict_large(path, names[path], output, window_logits, task, crop,
                                           stride, tile_size, batch_size, palette, probabilities)
        except SegtrainError as e:
            skip(path, str(e))
    summary = {"model_dir": model_dir, "checkpoint": os.path.basename(checkpoint_path), "step": step,
               "inference": described, "postprocess": postprocess, **({"export": export} if export else {}),
               "class_names": list(info.class_names), **({"multilabel": True} if task.multilabel else {}),
               "written": written, "skipped": skipped}
    write_json(os.path.join(output, SUMMARY_FILE), summary)
    if not written:
        raise SegtrainError(f"No image of --input could be read ({len(skipped)} skipped); nothing was predicted.")
    print(f"Wrote the masks of {len(written)} images to {output}"
          + (f"; skipped {len(skipped)} unreadable: {', '.join(sorted(skipped))}" if skipped else ""))
    return summary


def _large_windows(size, stride) -> tuple[tuple[int, int], tuple[int, int]]:
    """(crop, stride) of the sliding windows for large images: the inference options' slide
    windows, an export's input size or the training crop (a stride of None: two thirds of it)."""
    from segtrain.inference import InferenceOptions

    options = InferenceOptions("slide", tuple(int(v) for v in size), stride)
    return options.crop_size, options.stride


def _predict_large(path, name, output, window_logits, task, crop, stride, tile, batch_size, palette,
                   with_probabilities) -> list[str]:
    """One large image, tile by tile: ``<name>.tif`` (and ``<name>_probabilities.npy``); a
    multi-label model's labels as bits in the one TIFF."""
    num_classes = task.num_classes
    reader = tiles.open_regions(path)
    try:
        height, width = reader.height, reader.width
        print(f"{path}: {width}x{height}, tile by tile ({tile}x{tile} tiles, windows {crop[1]}x{crop[0]} "
              f"every {stride[1]}x{stride[0]})", flush=True)
        progress = Progress(f"predict {os.path.basename(path)}", len(tiles.tile_grid(height, width, tile)),
                            unit="tile")
        files = [f"{name}.tif"]
        probs_path = os.path.join(output, f"{name}_probabilities.npy")
        memmap = None
        if with_probabilities:
            files.append(os.path.basename(probs_path))
            memmap = np.lib.format.open_memmap(probs_path + ".tmp", mode="w+", dtype=np.float32,
                                               shape=(height, width, num_classes))

        def labels():
            for (t, left, b, r), logits in tiles.predict_tiles(
                    reader, window_logits, num_classes, crop, stride, tile, batch_size,
                    on_tile=lambda done, total: progress.update(done)):
                if memmap is not None:
                    memmap[t:b, left:r] = task.probabilities(logits).numpy()
                yield task.predict(logits).numpy().astype(np.uint8)

        try:
            tiles.write_tiled_mask(os.path.join(output, f"{name}.tif"), height, width, tile, labels(), palette)
            if memmap is not None:
                memmap.flush()
                del memmap
                os.replace(probs_path + ".tmp", probs_path)
        finally:
            if os.path.exists(probs_path + ".tmp"):
                os.remove(probs_path + ".tmp")
        progress.close()
        return files
    finally:
        reader.close()


def _results(image, shown, probs, name, info, palette, processor, with_probabilities, alpha,
             task) -> dict[str, bytes]:
    """Every output file of one image, {file name: bytes}, computed before any is written."""
    files = {}
    if processor is not None:
        processed = processor(image, probs)
        probs = processed.get("probabilities", probs)
        for class_index, instances in sorted(processed.get("instances", {}).items()):
            class_name = _file_safe(info.class_names[class_index])
            files[f"{name}_instances_{class_name}.png"] = images.encode(np.asarray(instances, np.uint16))
    labels = task.from_probabilities(probs).numpy().astype(np.uint8)
    colour = images.colorize(labels, palette)
    files[f"{name}.png"] = images.encode(labels)
    if task.multilabel:
        for i, present in enumerate(np.moveaxis(unpack_np(labels, task.num_classes), -1, 0)):
            files[f"{name}_{_file_safe(info.class_names[i])}.png"] = images.encode(present * np.uint8(255))
    files[f"{name}_color.png"] = images.encode(colour)
    files[f"{name}_overlay.jpg"] = images.encode(images.blend(shown, colour, alpha), "JPEG", quality=90)
    if with_probabilities:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(probs, np.float32))
        files[f"{name}_probabilities.npy"] = buffer.getvalue()
    return files


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))


def define_flags(fv):
    trained_run_flags(fv, "predict")
    input_flag(fv)
    flags.DEFINE_string("output", None, "Directory the masks, colour masks and overlays are written to.",
                        flag_values=fv)
    flags.DEFINE_bool("probabilities", False, "Also write each image's class probabilities as .npy [H,W,C].",
                      flag_values=fv)
    flags.DEFINE_bool("strict", False, "Stop at the first unreadable image (default: report it and go on).",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "Images of one size inferred together (gin: predict.batch_size).",
                         lower_bound=1, flag_values=fv)
    inference_flags(fv, "predict")
    flags.DEFINE_string("export", None, "Predict with this export (a directory `segtrain export` wrote, or its "
                        "model.tflite / model.onnx) in its own runtime instead of a checkpoint; no --model_dir "
                        "needed.", flag_values=fv)
    verbosity_flag(fv)
    flags.DEFINE_bool("calibrated", False, "Probabilities with the temperature `segtrain evaluate --calibrate` fitted "
                      "for the run (its calibration.json; gin: inference.temperature).", flag_values=fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain predict` from its parsed flags: each flag given is a gin binding of ``predict.*``."""
    return run(fv.model_dir, fv.gin_file, fv.gin_param, own_flags(fv))
