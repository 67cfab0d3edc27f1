#!/usr/bin/env python3
"""Training throughput of segtrain against two baselines measured in the same run.

    python benchmarks/bench_train.py                       # quickstart U-Net, 64x64, CPU grid
    python benchmarks/bench_train.py --models=unet --size=512 --batch=8 --precisions=float32,mixed_float16

For every setting of precision x XLA x replicas, one fresh process (a CPU split into replicas
needs one) times three loops on the same model, optimizer, batch and data:

  segtrain  the framework's own training window (Trainer.train_window: the compiled multi-step
            loop plus its per-window host work: finiteness check, metrics, learning rate)
  minimal   a hand-written tf.function GradientTape loop with the same steps per call: the floor
            of framework overhead
  fit       keras Model.fit with the same steps_per_execution (1 with several replicas, where
            Keras 3.15's multi-step fit fails under MirroredStrategy)

Each loop sees one fixed batch from memory, so the input pipeline is not measured here. The
rounds interleave the three (A B C A B C ...) and the median round counts, so a noisy neighbour
hurts all three alike. It prints images/s, the ratios segtrain/minimal and segtrain/fit, and the
model-FLOP utilisation: achieved FLOP/s (3 x the forward FLOPs counted by TensorFlow's profiler,
per image) over the peak FLOP/s of a large matmul in the compute dtype, measured in the same
process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gin_file", action="append", default=None,
                   help="gin files of the model (default: gin/quickstart.gin)")
    p.add_argument("--gin_param", action="append", default=[], help="extra gin bindings")
    p.add_argument("--models", default="", help="comma list of registry names (default: the gin file's model)")
    p.add_argument("--size", type=int, default=64, help="image height and width")
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--steps", type=int, default=20, help="steps per timed round (one compiled call)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per loop (median counts)")
    p.add_argument("--precisions", default="float32,mixed_bfloat16")
    p.add_argument("--xla", default="off,on", help="comma list of off/on")
    p.add_argument("--replicas", default="1,2",
                   help="comma list; >1 mirrors over that many GPUs, or CPU devices without GPUs")
    p.add_argument("--matmul", type=int, default=None, help="peak-FLOP matmul size (default 2048 CPU, 8192 GPU)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one setting
    return p.parse_args(argv)


# ---- one setting, in its own process -------------------------------------------------------
def measure(args, model: str, precision: str, xla: bool, replicas: int) -> dict:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if replicas > 1 and not gpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    import keras

    from registry import MODELS
    from segtrain.commands.configure import parse_config
    from segtrain.experiment import Experiment, ExperimentConfig
    from segtrain.train.optimizers import build_optimizer, loss_scaling
    from segtrain.train.trainer import Trainer

    if replicas > 1:
        devices = [f"/gpu:{i}" for i in range(replicas)] if gpus else [f"/cpu:{i}" for i in range(replicas)]
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")

    size, batch, steps = args.size, args.batch, args.steps
    bindings = list(args.gin_param) + [
        f"train.batch_size = {batch}", f"train.steps_per_loop = {steps}", f"train.precision = '{precision}'",
        f"train.xla = {xla}", f"pipeline.crop_size = ({size}, {size})", "train.num_image_panels = 0",
    ]
    if model:
        bindings.append(f"train.model = '{model}'")
    import warnings

    warnings.simplefilter("ignore")  # the CPU speed warnings: this is what is measured
    parse_config(args.gin_file or [os.path.join(REPO, "gin", "quickstart.gin")], bindings)

    config = ExperimentConfig()
    trainer = Trainer(Experiment(config, strategy, split=config.train_split), tempfile.mkdtemp(prefix="segtrain-bench-"))
    num_classes = trainer.experiment.info.num_classes
    rng = tf.random.Generator.from_seed(0)
    images = rng.normal([batch, size, size, 3])
    labels = rng.uniform([batch, size, size], 0, num_classes, dtype=tf.int32)
    data = tf.data.Dataset.from_tensors({"image": images, "label": labels}).repeat()
    dist = strategy.experimental_distribute_dataset(data)

    # The baselines: a fresh model of the same architecture, the same optimizer configuration.
    model_fn = MODELS.get(config.model)
    with strategy.scope():
        minimal_model = model_fn(num_classes=num_classes)
        minimal_opt = build_optimizer(config.num_steps, precision)
        minimal_opt.build(minimal_model.trainable_variables)
        fit_model = model_fn(num_classes=num_classes)
        # Keras 3.15's multi-step fit fails under MirroredStrategy ("You must feed a value for
        # placeholder tensor 'while/cond/...'"), so with replicas it runs one step per call.
        fit_steps_per_execution = steps if replicas == 1 else 1
        fit_model.compile(
            optimizer=build_optimizer(config.num_steps, precision),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            steps_per_execution=fit_steps_per_execution, jit_compile=xla,
        )
        fit_model.optimizer.build(fit_model.trainable_variables)  # in scope, as MirroredStrategy needs
    scaling = loss_scaling(minimal_opt)

    def loss_and_grads(x, y):
        with tf.GradientTape() as tape:
            logits = minimal_model(x, training=True)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)) / (batch * size * size)
            scaled = minimal_opt.scale_loss(loss) if scaling else loss
        return loss, tape.gradient(scaled, minimal_model.trainable_variables)

    compiled = tf.function(loss_and_grads, jit_compile=True) if xla else loss_and_grads

    def minimal_step(b):
        loss, grads = compiled(b["image"], b["label"])
        minimal_opt.apply_gradients(zip(grads, minimal_model.trainable_variables))
        return loss

    @tf.function
    def minimal_loop(iterator, n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            total += strategy.reduce("SUM", strategy.run(minimal_step, args=(next(iterator),)), axis=None)
        return total

    minimal_it = iter(dist)
    segtrain_it = iter(dist)
    fit_data = tf.data.Dataset.from_tensors((images, labels)).repeat()

    def run_segtrain(first=False):
        trainer.train_window(segtrain_it, 0, steps, first=first)

    def run_minimal(first=False):
        float(minimal_loop(minimal_it, tf.constant(steps)))

    def run_fit(first=False):
        fit_model.fit(fit_data, steps_per_epoch=steps, epochs=1, verbose=0)

    loops = {"segtrain": run_segtrain, "minimal": run_minimal, "fit": run_fit}
    fit_error = None
    for name, fn in list(loops.items()):  # trace / compile, then one untimed warm round
        try:
            fn(first=True)
        except tf.errors.OpError as e:
            if name != "fit":
                raise
            # Keras compiles fit's whole step; with XLA that fails under MirroredStrategy over
            # logical CPU devices ("Trying to access resource ... located in device CPU:1").
            lines = [x.strip() for x in e.message.splitlines() if x.strip()]
            fit_error = next((x for x in lines if "Trying to access resource" in x), lines[-1] if lines else "")[:200]
            del loops["fit"]
            continue
        fn()
    times = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, fn in loops.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    images_per_s = {name: batch * steps / statistics.median(t) for name, t in times.items()}
    images_per_s.setdefault("fit", None)

    from segtrain.models.zoo import forward_flops

    flops_per_image = 3 * forward_flops(trainer.model, size)
    dtype = {"float32": tf.float32, "mixed_float16": tf.float16, "mixed_bfloat16": tf.bfloat16}[precision]
    peak = peak_flops(dtype, args.matmul or (8192 if gpus else 2048)) * max(1, replicas if gpus else 1)
    return {
        "precision": precision, "xla": xla, "replicas": replicas, "model": config.model,
        "size": size, "batch": batch, "steps": steps, "rounds": args.rounds,
        "fit_steps_per_execution": fit_steps_per_execution,
        **{f"{k}_images_per_s": v for k, v in images_per_s.items()},
        "segtrain_vs_minimal": images_per_s["segtrain"] / images_per_s["minimal"],
        "segtrain_vs_fit": images_per_s["segtrain"] / images_per_s["fit"] if images_per_s["fit"] else None,
        "fit_error": fit_error,
        "train_gflop_per_image": flops_per_image / 1e9,
        "peak_gflop_per_s": peak / 1e9,
        "mfu": images_per_s["segtrain"] * flops_per_image / peak,
        "device": gpu_name(gpus) or platform.processor() or platform.machine(),
    }


def peak_flops(dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` n x n matmuls (in a loop of 4) in ``dtype``."""
    import tensorflow as tf

    a = tf.random.normal([n, n], dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)

    @tf.function
    def matmuls(a, b):
        out = tf.zeros([n, n], dtype)
        for _ in tf.range(4):
            out += tf.matmul(a, b)
        return tf.reduce_sum(tf.cast(out[:1, :1], tf.float32))

    float(matmuls(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(matmuls(a, b))
        best = min(best, time.perf_counter() - t0)
    return 4 * 2 * n**3 / best


def gpu_name(gpus) -> str | None:
    if not gpus:
        return None
    import tensorflow as tf

    return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")


# ---- the grid, one process per setting ----------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        model, precision, xla, replicas = args.one.split(":")
        row = measure(args, model, precision, xla == "on", int(replicas))
        print("ROW " + json.dumps(row), flush=True)
        return 0
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])
                   if not a.startswith(("--models", "--precisions", "--xla", "--replicas", "--json"))]
    rows = []
    grid = [(m, p, x, r) for m in args.models.split(",") for p in args.precisions.split(",")
            for x in args.xla.split(",") for r in args.replicas.split(",")]
    for i, (model, precision, xla, replicas) in enumerate(grid):
        print(f"[{i + 1}/{len(grid)}] model={model or '(gin)'} precision={precision} xla={xla} replicas={replicas}",
              file=sys.stderr, flush=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *passthrough, f"--one={model}:{precision}:{xla}:{replicas}"],
            capture_output=True, text=True, env=env, cwd=REPO,
        )
        line = next((x for x in result.stdout.splitlines() if x.startswith("ROW ")), None)
        if result.returncode or line is None:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            print(f"  failed (exit {result.returncode}):\n{tail}", file=sys.stderr)
            rows.append({"model": model, "precision": precision, "xla": xla == "on", "replicas": int(replicas),
                         "error": tail})
            continue
        rows.append(json.loads(line[4:]))
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


def table(rows: list[dict], args) -> str:
    ok = [r for r in rows if "error" not in r]
    head = ok[0] if ok else {}
    lines = [
        f"# bench_train  {datetime.date.today()}  size={args.size} batch={args.batch} "
        f"steps/call={args.steps} rounds={args.rounds}  device={head.get('device', '?')}",
        "",
        "| model | precision | xla | replicas | segtrain img/s | minimal img/s | fit img/s | segtrain/minimal "
        "| segtrain/fit | GFLOP/img (train) | peak GFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model'] or '(gin)'} | {r['precision']} | {'on' if r['xla'] else 'off'} "
                         f"| {r['replicas']} | failed: "
                         f"{r['error'].splitlines()[-1][:80] if r['error'] else '?'} ||||||||")
            continue
        lines.append(
            f"| {r['model']} | {r['precision']} | {'on' if r['xla'] else 'off'} | {r['replicas']} "
            f"| {r['segtrain_images_per_s']:.1f} | {r['minimal_images_per_s']:.1f} | {_num(r['fit_images_per_s'], 1)} "
            f"| {r['segtrain_vs_minimal']:.3f} | {_num(r['segtrain_vs_fit'], 3)} | {r['train_gflop_per_image']:.3f} "
            f"| {r['peak_gflop_per_s']:.0f} | {100 * r['mfu']:.1f}% |"
        )
    notes = [f"- fit n/a ({r['precision']}, xla {'on' if r['xla'] else 'off'}, {r['replicas']} replicas): "
             f"{r['fit_error']}" for r in ok if r.get("fit_error")]
    if any(r.get("fit_steps_per_execution") == 1 and r["steps"] > 1 for r in ok):
        notes.append("- fit with several replicas runs 1 step per call: Keras 3.15's multi-step fit fails "
                     "under MirroredStrategy.")
    return "\n".join(lines + ([""] + notes if notes else []))


def _num(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
