#!/usr/bin/env python3
"""Inference throughput of segtrain against plain ``model.predict``, on the same images, same run.

    python benchmarks/bench_infer.py --model_dir=runs/quickstart
    python benchmarks/bench_infer.py --model_dir=runs/quickstart --num_images=64 --size=256,256 --batch=8

It restores a trained run (weights only), makes ``--num_images`` photo-like RGB images of one
``--size`` (written as PNG files for `segtrain predict`), and times four ways of getting every
image's class probabilities:

  model.predict    the baseline: Keras' ``model.predict`` on the images already normalised and
                   in memory, then a softmax (no decoding, no files, no padding)
  inference        segtrain's ``Inference`` in a ``tf.function`` on uint8 images in memory:
                   normalisation, padding to the size divisor, the model, softmax
  predict          the whole `segtrain predict` command on the PNG files: decode, infer in
                   batches of one size, write the class PNG, colour PNG and overlay JPEG
  saved_model      the exported SavedModel (`segtrain export`), loaded with
                   ``tf.saved_model.load``: its ``serving_default`` signature on uint8 batches

Each is warmed up once (tracing, the first batch), then timed ``--rounds`` times over every
image, the rounds interleaved so a noisy neighbour hurts all alike; the best round counts. It
prints images/s of each and each one's speed as a ratio to model.predict's.

    python benchmarks/bench_infer.py --model_dir=runs/quickstart --formats --size=96,96

With ``--formats`` it compares the export formats instead: it writes each export with `segtrain
export` (SavedModel, ONNX, TFLite float32 / float16 / dynamic / int8 at ``--size``, int8
calibrated on ``--calibration_images`` training images), then gives per format:

  latency     milliseconds per image of ``--size`` at batch 1 and at batch 8 in the export's own
              runtime (TensorFlow, ONNX Runtime, the LiteRT interpreter), best of ``--rounds``
              rounds interleaved across formats, and as a multiple of the SavedModel's speed
  size        the model file (the SavedModel directory's files)
  mean IoU    on ``--split`` with `segtrain evaluate --export`'s code: the export sees uint8
              images as a client sends them (a TFLite export resizes them to its one size),
              next to the checkpoint's own mean IoU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def photo_like(n: int, h: int, w: int, seed: int = 0):
    """Smooth gradients with a few shapes: compresses and looks like a photo, unlike noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        base = np.stack([(yy * rng.uniform(0.2, 1) + xx * rng.uniform(0.2, 1) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], -1)
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(h // 8, h // 3)
        base[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        out[i] = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    return out


EXPORTS = (("saved_model", "saved_model", None), ("onnx", "onnx", None), ("tflite float32", "tflite", None),
           ("tflite float16", "tflite", "float16"), ("tflite dynamic", "tflite", "dynamic"),
           ("tflite int8", "tflite", "int8"))


def file_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def formats(args) -> int:
    """The --formats table (see the module doc)."""
    h, w = (int(v) for v in args.size.split(","))

    import tensorflow as tf

    import gin
    from segtrain.commands import export as export_command
    from segtrain.commands.trained_run import parse_run, restored
    from segtrain.evaluation import evaluate_exported
    from segtrain.export import runtime

    work = tempfile.mkdtemp(prefix="bench_export_")
    paths = {}
    for name, fmt, quantize in EXPORTS:
        gin.clear_config()
        parse_run(args.model_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            paths[name] = export_command.export(
                args.model_dir, output=os.path.join(work, name.replace(" ", "_")), format=fmt, quantize=quantize,
                image_size=(h, w) if fmt == "tflite" else None, calibration_images=args.calibration_images)
    gin.clear_config()
    parse_run(args.model_dir)
    experiment, _, step = restored(args.model_dir, split=args.split)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        reference, _ = experiment.evaluator().run(experiment.eval_dataset(args.split))
    loaded = {name: runtime.load(path) for name, path in paths.items()}
    miou, sizes = {}, {}
    for name, exported in loaded.items():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            results, _ = evaluate_exported(exported.logits, experiment.eval_dataset(args.split), experiment.info,
                                           experiment.loss_fn, experiment.normalization, experiment.metric_names)
        miou[name] = results["mean_iou"]
        sizes[name] = file_size(exported.path)

    images = photo_like(args.num_images, h, w)
    best = {}
    for exported in loaded.values():  # warm-up: the first call allocates and compiles
        exported(images[:1])
        exported(images[:8])
    for _ in range(args.rounds):
        for name, exported in loaded.items():
            for batch in (1, 8):
                t0 = time.perf_counter()
                for start in range(0, len(images), batch):
                    exported(images[start:start + batch])
                ms = 1000 * (time.perf_counter() - t0) / len(images)
                best[name, batch] = min(best.get((name, batch), float("inf")), ms)
    print(f"{args.model_dir} (step {step}, model {experiment.config.model}); {args.num_images} images of {h}x{w}, "
          f"best of {args.rounds} rounds; mean IoU on split '{args.split}'; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, TensorFlow {tf.__version__}")
    print(f"checkpoint (TensorFlow, at each image's own size): mean IoU {reference['mean_iou']:.4f}")
    base1, base8 = best["saved_model", 1], best["saved_model", 8]
    print(f"{'export':<16} {'ms/img b1':>9} {'vs SM':>6} {'ms/img b8':>9} {'vs SM':>6} {'size':>10} {'mean IoU':>9} "
          f"{'vs ckpt':>8}")
    for name in loaded:
        b1, b8 = best[name, 1], best[name, 8]
        print(f"{name:<16} {b1:>9.2f} {base1 / b1:>5.2f}x {b8:>9.2f} {base8 / b8:>5.2f}x "
              f"{sizes[name] / 1e6:>8.2f}MB {miou[name]:>9.4f} {miou[name] - reference['mean_iou']:>+8.4f}")
    print("(vs SM: speed as a multiple of the SavedModel's; vs ckpt: mean IoU change against the checkpoint)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default="runs/quickstart", help="a run `segtrain train` wrote")
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--size", default="256,256", help="H,W of every image")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", action="store_true", help="compare the export formats (see above)")
    parser.add_argument("--split", default="test", help="--formats: the split mean IoU is measured on")
    parser.add_argument("--calibration_images", type=int, default=100, help="--formats: int8 calibration images")
    args = parser.parse_args()
    if args.formats:
        return formats(args)
    h, w = (int(v) for v in args.size.split(","))

    import tensorflow as tf
    from PIL import Image

    import gin
    from segtrain import export as export_lib
    from segtrain.commands import predict as predict_command
    from segtrain.commands.trained_run import parse_run, restored

    parse_run(args.model_dir)
    experiment, _, step = restored(args.model_dir)
    model, normalization = experiment.model, experiment.normalization
    inference = experiment.inference()
    images = photo_like(args.num_images, h, w)
    work = tempfile.mkdtemp(prefix="bench_infer_")
    inputs = os.path.join(work, "images")
    os.makedirs(inputs)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(inputs, f"{i:04d}.png"))
    normalised = normalization(tf.constant(images)).numpy()

    # The baseline gets images its model takes as they are: height and width multiples of the divisor.
    divisor = experiment.facts.size_divisor
    if h % divisor or w % divisor:
        raise SystemExit(f"--size={h},{w}: use multiples of the model's size divisor {divisor} for the baseline")

    export_dir = os.path.join(work, "export", "1")
    export_lib.export_model(export_dir, model, inference.logits, normalization, experiment.info.num_classes,
                            divisor, probabilities=True, metadata={}, overwrite=False)
    serving = tf.saved_model.load(export_dir).signatures["serving_default"]
    run_inference = tf.function(lambda x: inference.probabilities(normalization(x)), reduce_retracing=True)

    def batches(array):
        for start in range(0, len(array), args.batch):
            yield array[start:start + args.batch]

    def keras_predict():
        tf.nn.softmax(model.predict(normalised, batch_size=args.batch, verbose=0)).numpy()

    def segtrain_inference():
        for b in batches(images):
            run_inference(tf.constant(b)).numpy()

    def saved_model():
        for b in batches(images):
            serving(images=tf.constant(b))["probabilities"].numpy()

    def predict():
        gin.clear_config()
        parse_run(args.model_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            predict_command.predict(args.model_dir, input=inputs, output=os.path.join(work, "out"),
                                    batch_size=args.batch)

    ways = {"model.predict": keras_predict, "inference": segtrain_inference, "predict": predict,
            "saved_model": saved_model}
    best = {}
    for fn in ways.values():
        fn()  # warm-up: tracing and the first batch
    for _ in range(args.rounds):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            rate = args.num_images / (time.perf_counter() - t0)
            best[name] = max(best.get(name, 0.0), rate)
    print(f"{args.model_dir} (step {step}, model {experiment.config.model}), {args.num_images} images of "
          f"{h}x{w}, batch {args.batch}, best of {args.rounds} rounds; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, TensorFlow {tf.__version__}")
    print(f"{'':<14} {'images/s':>9} {'vs model.predict':>17}")
    for name in ways:
        print(f"{name:<14} {best[name]:>9.1f} {best[name] / best['model.predict']:>16.2f}x")
    print("(predict is the whole command: it also builds the model and restores its checkpoint, decodes the PNG "
          "files and writes three files per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
