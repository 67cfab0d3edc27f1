#!/usr/bin/env python3
"""Evaluation throughput of segtrain's Evaluator, XLA off and on, against model.predict, same run.

    python benchmarks/bench_eval.py                                   # quickstart U-Net, 52 images of 128x128
    python benchmarks/bench_eval.py --num_images=200 --size=512 --batch=16 --gin_file=gin/models/unet.gin

It builds the model of ``--gin_file`` (default: gin/quickstart.gin; random weights: the speed
does not depend on them), makes ``--num_images`` normalised images of ``--size`` and their
labels (the dataset's classes, 5% ignore label) in memory, and times four ways of turning them
into the summed confusion matrix:

  predict       the baseline: Keras' ``model.predict`` on the images (``jit_compile=False``),
                then argmax and ``np.bincount`` of (label, prediction) over the labelled pixels
  predict_xla   the same, the model compiled with ``jit_compile=True``
  segtrain      ``Evaluator.run`` over a ``tf.data.Dataset`` of the same tensors: the
                compiled multi-batch loop of every evaluation (it also sums the loss)
  segtrain_xla  ``Evaluator(xla=True)``: the forward pass compiled by XLA once, the smaller
                last batch padded to the full size (``train.xla`` with ``pipeline.eval_size``)

``--num_images`` is best not a multiple of ``--batch``, so the last, smaller batch is in every
pass. Each way is warmed up once (tracing, compiling), then the rounds interleave the four
(A B C D A B C D ...) and the median round counts, so a noisy neighbour hurts all alike. The
four confusion matrices are compared: they must agree (XLA's float rounding may move a pixel
whose two best classes tie). It prints images/s and each way's ratio to ``predict``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gin_file", action="append", default=None, help="gin files of the model (default: quickstart)")
    p.add_argument("--gin_param", action="append", default=[], help="extra gin bindings")
    p.add_argument("--num_images", type=int, default=52)
    p.add_argument("--size", type=int, default=128, help="image height and width")
    p.add_argument("--batch", type=int, default=8, help="global batch size")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per way (median counts)")
    p.add_argument("--replicas", type=int, default=1,
                   help=">1: MirroredStrategy over that many GPUs, or logical CPU devices without GPUs")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def confusion_matrix(labels, predictions, num_classes: int, ignore: int):
    import numpy as np

    keep = labels != ignore
    pairs = num_classes * labels[keep].astype(np.int64) + predictions[keep]
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def main(argv=None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if args.replicas > 1 and not gpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    import numpy as np

    from registry import MODELS
    from segtrain.commands.configure import parse_config
    from segtrain.evaluation import Evaluator
    from segtrain.experiment import Experiment, ExperimentConfig

    if args.replicas > 1:
        kind = "gpu" if gpus else "cpu"
        strategy = tf.distribute.MirroredStrategy([f"/{kind}:{i}" for i in range(args.replicas)])
    else:
        strategy = tf.distribute.get_strategy()
    import warnings

    warnings.simplefilter("ignore")  # the CPU speed warnings: this is what is measured
    parse_config(args.gin_file or [os.path.join(REPO, "gin", "quickstart.gin")], args.gin_param)
    experiment = Experiment(ExperimentConfig(), strategy)
    model, info = experiment.model, experiment.info
    c, ignore, size, n = info.num_classes, info.ignore_label, args.size, args.num_images
    divisor = experiment.facts.size_divisor
    if size % divisor:
        raise SystemExit(f"bench_eval: --size={size} does not suit the model: use a multiple of {divisor}.")

    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, c, (n, size, size)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.05] = ignore
    dataset = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(args.batch)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)

    evaluators = {xla: Evaluator(model, experiment.loss_fn, info, strategy, experiment.metric_names,
                                 inference=experiment.inference(), xla=xla) for xla in (False, True)}
    # The baselines: the same weights in models of the same architecture, compiled for predict.
    with strategy.scope():
        baselines = {}
        for xla in (False, True):
            copy = MODELS.get(experiment.config.model)(num_classes=c)
            copy.set_weights(model.get_weights())
            copy.compile(jit_compile=xla)
            baselines[xla] = copy

    def predict(xla: bool):
        def run():
            logits = baselines[xla].predict(images, batch_size=args.batch, verbose=0)
            return confusion_matrix(labels, np.argmax(logits, -1), c, ignore)
        return run

    def evaluate(xla: bool):
        def run():
            with contextlib.redirect_stdout(io.StringIO()):  # the progress line
                return evaluators[xla].run(dataset)[1]
        return run

    ways = {"predict": predict(False), "predict_xla": predict(True),
            "segtrain": evaluate(False), "segtrain_xla": evaluate(True)}
    matrices, warmup = {}, {}
    for name, fn in ways.items():
        t0 = time.perf_counter()
        matrices[name] = fn()
        warmup[name] = time.perf_counter() - t0
    times = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    per_s = {name: n / statistics.median(t) for name, t in times.items()}
    reference = matrices["predict"]
    differing = {name: int(np.abs(m - reference).sum()) for name, m in matrices.items()}
    labelled = int(reference.sum())
    result = {
        "date": str(datetime.date.today()), "device": device(gpus), "tensorflow": tf.__version__,
        "model": experiment.config.model, "precision": experiment.config.precision, "size": size,
        "batch": args.batch, "num_images": n, "replicas": strategy.num_replicas_in_sync, "rounds": args.rounds,
        "images_per_s": per_s, "vs_predict": {k: v / per_s["predict"] for k, v in per_s.items()},
        "first_pass_s": warmup, "cm_pixels_differing": differing, "labelled_pixels": labelled,
    }
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    # Every way must count the same pixels, and agree but for ties.
    agree = all(int(m.sum()) == labelled for m in matrices.values()) and max(differing.values()) <= 1e-3 * labelled
    if not agree:
        print(f"bench_eval: the confusion matrices disagree: {differing}", file=sys.stderr)
    return 0 if agree else 1


def device(gpus) -> str:
    if gpus:
        import tensorflow as tf

        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return platform.processor() or platform.machine()


def table(r: dict) -> str:
    lines = [
        f"# bench_eval  {r['date']}  model={r['model']} {r['precision']} size={r['size']} batch={r['batch']} "
        f"images={r['num_images']} replicas={r['replicas']} rounds={r['rounds']}  device={r['device']}",
        "",
        "| way | images/s | vs predict | first pass s | cm pixels differing from predict |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, value in r["images_per_s"].items():
        lines.append(f"| {name} | {value:.1f} | {r['vs_predict'][name]:.2f}x | {r['first_pass_s'][name]:.1f} "
                     f"| {r['cm_pixels_differing'][name]} of {r['labelled_pixels']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
