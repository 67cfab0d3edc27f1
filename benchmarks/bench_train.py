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

``--input`` says where the batches come from: ``memory``, one fixed batch (the input pipeline
is not measured), or ``pipeline``, the training pipeline (segtrain.data: decode, random scale,
crop, flip, colour jitter) over a prepared Pascal VOC 2012 that ``benchmarks/bench_input.py``
fabricates (``--workdir`` keeps it for the next run), each loop with its own iterator, or
``pipeline_on_device``, the same with ``pipeline.colour_on_device`` (uint8 crops; segtrain and
the minimal loop jitter and normalise them in their step, compiled with it under XLA; fit, which
takes (image, label) pairs, in its input map). Both
losses skip the ignore label, as segtrain's does. fit runs once, one epoch per round, so its
input is not restarted between rounds; at each timed epoch's end the other two run a round.
The rounds so interleave the three (fit, segtrain, minimal, fit, ...) and the median round
counts, so a noisy neighbour hurts all three alike.

A size the model cannot take (its size divisor) is rounded to the nearest one it takes, and the
table says so: ``--models=unet:572`` trains the U-Net at 576.

One replica runs under the default strategy, as ``segtrain train`` does on one device; more
mirror over GPUs, or over logical CPU devices without GPUs. Each process runs with the CPU
allocator of ``--cpu_allocators``: ``bfc``, what the ``segtrain`` command sets, or TensorFlow's
``default``, which made every strategy but the default one about 2x slower on a CPU.

It prints images/s, the ratios segtrain/minimal and segtrain/fit, each loop's spread over its
rounds, and the model-FLOP utilisation: achieved FLOP/s (3 x the forward FLOPs counted by
TensorFlow's profiler, per image) over the peak: the best sustained rate of large matmuls in the
compute dtype (several sizes, plain and XLA; one process per dtype in the same run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
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
    p.add_argument("--models", default="",
                   help="comma list of registry names, each with its size if not --size: unet:576,deeplabv3:513 "
                        "(default: the gin file's model)")
    p.add_argument("--size", type=int, default=64, help="image height and width")
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--steps", type=int, default=20, help="steps per timed round (one compiled call)")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds per loop (median counts; the ratio's 95%% interval narrows as 1/sqrt(rounds))")
    p.add_argument("--target", type=float, default=0.97,
                   help="segtrain/minimal to check each row against: met, below or unsettled at 95%%")
    p.add_argument("--precisions", default="float32,mixed_bfloat16")
    p.add_argument("--xla", default="off,on", help="comma list of off/on")
    p.add_argument("--replicas", default="1,2",
                   help="comma list; >1 mirrors over that many GPUs, or CPU devices without GPUs")
    p.add_argument("--input", default="memory",
                   help="comma list of memory (one batch in memory) / pipeline (the training input pipeline "
                        "over a fabricated, prepared VOC dataset) / pipeline_on_device (the same with "
                        "pipeline.colour_on_device: colour jitter and normalisation in the training step)")
    p.add_argument("--data_dir", default=None,
                   help="--input=pipeline: a prepared voc2012 directory (default: fabricate one in --workdir)")
    p.add_argument("--workdir", default=None, help="where the fabricated VOC dataset is kept (reused when there)")
    p.add_argument("--voc_images", type=int, default=200, help="training images of the fabricated VOC dataset")
    p.add_argument("--cpu_allocators", default="bfc",
                   help="comma list of bfc (TF_CPU_ALLOCATOR_USE_BFC=true, what the segtrain command runs with) / "
                        "default (TensorFlow's malloc-based CPU allocator)")
    p.add_argument("--matmul", default=None,
                   help="comma list of peak-FLOP matmul sizes; the largest sustained rate counts "
                        "(default 1024,2048,4096 on a CPU, 4096,8192 on a GPU)")
    p.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True,
                   help="also time Model.fit (--no-fit: only segtrain and the minimal loop, for large models)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one setting
    p.add_argument("--peak", type=float, default=None, help=argparse.SUPPRESS)  # internal: the measured peak
    return p.parse_args(argv)


# ---- one setting, in its own process -------------------------------------------------------
def nearest_size(size: int, divisor: int) -> int:
    """The multiple of ``divisor`` nearest to ``size`` (the larger one on a tie)."""
    lower = size // divisor * divisor
    return lower if lower and size - lower < lower + divisor - size else lower + divisor


def measure(args, model: str, size: int, precision: str, xla: bool, replicas: int, source: str) -> dict:
    import gin
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
    else:  # what `segtrain train --strategy=auto` runs on one GPU or a CPU: the default strategy
        strategy = tf.distribute.get_strategy()

    requested, batch, steps = size, args.batch, args.steps
    files = list(args.gin_file or [os.path.join(REPO, "gin", "quickstart.gin")])
    bindings = list(args.gin_param)
    if source != "memory":  # VOC's training augmentation (random scale 0.5-2, crop, flip, colour)
        files.append(os.path.join(REPO, "gin", "datasets", "voc2012.gin"))
        bindings.append(f"DATA_DIR = {args.data_dir!r}")
        bindings.append(f"pipeline.colour_on_device = {source == 'pipeline_on_device'}")
    bindings += [
        f"train.batch_size = {batch}", f"train.steps_per_loop = {steps}", f"train.precision = '{precision}'",
        f"train.xla = {xla}", f"pipeline.crop_size = ({size}, {size})", "train.num_image_panels = 0",
    ]
    if model:
        bindings.append(f"train.model = '{model}'")
    import warnings

    warnings.simplefilter("ignore")  # the CPU speed warnings: this is what is measured
    parse_config(files, bindings)

    config = ExperimentConfig()
    experiment = Experiment(config, strategy, split=config.train_split)
    size = nearest_size(requested, experiment.facts.size_divisor)
    gin.bind_parameter("pipeline.crop_size", (size, size))
    trainer = Trainer(experiment, tempfile.mkdtemp(prefix="segtrain-bench-"))
    num_classes, ignore = experiment.info.num_classes, experiment.info.ignore_label
    if source != "memory":
        segtrain_it, _ = trainer.iterator(config.seed)
        minimal_it, _ = trainer.iterator(config.seed + 1)
        fit_data = experiment.train_dataset(config.seed + 2).map(experiment.finish_batch)
    else:
        rng = tf.random.Generator.from_seed(0)
        images = rng.normal([batch, size, size, 3])
        labels = rng.uniform([batch, size, size], 0, num_classes, dtype=tf.int32)
        data = tf.data.Dataset.from_tensors({"image": images, "label": labels}).repeat()
        dist = strategy.experimental_distribute_dataset(data)
        minimal_it, segtrain_it = iter(dist), iter(dist)
        fit_data = tf.data.Dataset.from_tensors((images, labels)).repeat()

    # The baselines: a fresh model of the same architecture, the same optimizer configuration.
    model_fn = MODELS.get(config.model)
    with strategy.scope():
        minimal_model = model_fn(num_classes=num_classes)
        minimal_opt = build_optimizer(config.num_steps, precision)
        minimal_opt.build(minimal_model.trainable_variables)
        fit_model = model_fn(num_classes=num_classes) if args.fit else None
        # Keras 3.15's multi-step fit fails under MirroredStrategy ("You must feed a value for
        # placeholder tensor 'while/cond/...'"), so with replicas it runs one step per call.
        fit_steps_per_execution = steps if replicas == 1 else 1
        if fit_model is not None:
            fit_model.compile(
                optimizer=build_optimizer(config.num_steps, precision),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore),
                steps_per_execution=fit_steps_per_execution, jit_compile=xla,
            )
            fit_model.optimizer.build(fit_model.trainable_variables)  # in scope, as MirroredStrategy needs
    scaling = loss_scaling(minimal_opt)

    def loss_and_grads(x, y):
        with tf.GradientTape() as tape:
            logits = minimal_model(x, training=True)
            labelled = tf.not_equal(y, ignore)
            per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.where(labelled, y, 0), logits)
            loss = tf.reduce_sum(tf.where(labelled, per_pixel, 0.0)) / (batch * size * size)
            scaled = minimal_opt.scale_loss(loss) if scaling else loss
        return loss, tape.gradient(scaled, minimal_model.trainable_variables)

    compiled = tf.function(loss_and_grads, jit_compile=True) if xla else loss_and_grads

    # pipeline.colour_on_device: the baselines finish their uint8 batches in the step, as segtrain does.
    finish = tf.function(experiment.finish_batch, jit_compile=True) if xla else experiment.finish_batch

    def minimal_step(b):
        loss, grads = compiled(*(finish(b) if b["image"].dtype == tf.uint8 else (b["image"], b["label"])))
        minimal_opt.apply_gradients(zip(grads, minimal_model.trainable_variables))
        return loss

    @tf.function
    def minimal_loop(iterator, n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            total += strategy.reduce("SUM", strategy.run(minimal_step, args=(next(iterator),)), axis=None)
        return total

    def run_segtrain(first=False):
        trainer.train_window(segtrain_it, 0, steps, first=first)

    def run_minimal(first=False):
        float(minimal_loop(minimal_it, tf.constant(steps)))

    loops = {"segtrain": run_segtrain, "minimal": run_minimal}
    for fn in loops.values():  # trace / compile, then one untimed warm round
        fn(first=True)
        fn()
    times = {"fit": [], **{name: [] for name in loops}}

    def other_round():
        # segtrain first in even rounds, the minimal loop first in odd ones, so what runs first in
        # a round (a warmer cache, a neighbour's burst) does not favour one loop throughout
        order = list(loops.items())
        for name, fn in order if len(times["segtrain"]) % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    class Rounds(keras.callbacks.Callback):
        """fit's epochs 0 (tracing) and 1 (warm) untimed, then one timed epoch per round, each
        followed by a round of the other loops."""

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            float((logs or {}).get("loss", 0.0))  # the epoch's last step has finished
            if epoch >= 2:
                times["fit"].append(time.perf_counter() - self.t0)
                other_round()

    fit_error = None
    try:
        if args.fit:
            fit_model.fit(fit_data, steps_per_epoch=steps, epochs=args.rounds + 2, verbose=0,
                          callbacks=[Rounds()])
    except tf.errors.OpError as e:
        # Keras compiles fit's whole step; with XLA that fails under MirroredStrategy over
        # logical CPU devices ("Trying to access resource ... located in device CPU:1").
        lines = [x.strip() for x in e.message.splitlines() if x.strip()]
        fit_error = next((x for x in lines if "Trying to access resource" in x), lines[-1] if lines else "")[:200]
    while len(times["segtrain"]) < args.rounds:  # the rounds a failed fit did not drive
        other_round()
    images_per_s = {name: batch * steps / statistics.median(t) if t else None for name, t in times.items()}

    from segtrain.models.zoo import forward_flops

    flops_per_image = 3 * forward_flops(trainer.model, size)
    # the peak of one device (measured in its own process), times the GPUs used; CPU replicas share one CPU
    peak = args.peak * max(1, replicas if gpus else 1)

    # in each round segtrain and minimal run back to back: a drift of the machine's speed
    # cancels in their ratio
    ratios = [m / s for s, m in zip(times["segtrain"], times["minimal"])]

    def spread(t):  # how far a loop's rounds scatter: (slowest - fastest) / median
        return (max(t) - min(t)) / statistics.median(t) if t else None
    return {
        "precision": precision, "xla": xla, "replicas": replicas, "model": config.model, "input": source,
        "size": size, "size_requested": requested, "size_divisor": experiment.facts.size_divisor,
        "batch": batch, "steps": steps, "rounds": args.rounds,
        "fit_steps_per_execution": fit_steps_per_execution,
        **{f"{k}_images_per_s": v for k, v in images_per_s.items()},
        "segtrain_vs_minimal": images_per_s["segtrain"] / images_per_s["minimal"],
        "segtrain_vs_fit": images_per_s["segtrain"] / images_per_s["fit"] if images_per_s["fit"] else None,
        "fit_error": fit_error,
        "round_seconds": times, **{f"{k}_spread": spread(t) for k, t in times.items()},
        "round_ratios": ratios,
        "ratio_interval": paired_interval(ratios),
        "cpu_allocator": "bfc" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true") else "default",
        "train_gflop_per_image": flops_per_image / 1e9,
        "peak_gflop_per_s": peak / 1e9,
        "mfu": images_per_s["segtrain"] * flops_per_image / peak,
        "device": gpu_name(gpus) or platform.processor() or platform.machine(),
    }


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def paired_interval(ratios) -> tuple[float, float, float] | None:
    """(geometric mean, low, high): a 95% confidence interval of segtrain/minimal from per-round ratios.

    Each round times both loops back to back, so a drift of the machine's speed cancels in the
    round's ratio; what is left scatters round to round. The interval is Student's t over the
    log ratios (a ratio's errors multiply), so it narrows as 1/sqrt(rounds) and says when enough
    rounds were run: a target is shown when the low end clears it, refuted when the high end
    does not reach it. None for fewer than 2 rounds.
    """
    logs = [math.log(r) for r in ratios]
    if len(logs) < 2:
        return None
    mean, sem = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    t = _T95[len(logs) - 2] if len(logs) - 1 <= len(_T95) else 1.96
    return math.exp(mean), math.exp(mean - t * sem), math.exp(mean + t * sem)


def verdict(interval, target: float) -> str:
    """'met', 'below' or 'unsettled': where a 95% interval lies against ``target``."""
    if interval is None:
        return "unsettled"
    _, low, high = interval
    return "met" if low >= target else "below" if high < target else "unsettled"


def peak_flops(dtype, sizes, seconds: float = 1.0, windows: int = 3) -> tuple[float, str]:
    """The largest sustained matmul rate in ``dtype``: FLOP/s and how it was reached.

    Every size in ``sizes`` (n x n by n x n), as a plain and as an XLA-compiled tf.function, runs
    for ``windows`` windows of at least ``seconds`` each after one warm call; the best window of
    all counts. A matmul uses every core (TensorFlow's intra-op thread pool), so this is the
    machine's attainable peak for the dense work a convolution network is made of.
    """
    import tensorflow as tf

    best, how = 0.0, ""
    for n in sizes:
        a = tf.random.normal([n, n], dtype=tf.float32)
        a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
        for jit in (False, True):
            fn = tf.function(lambda a, b: tf.cast(tf.matmul(a, b)[0, 0], tf.float32), jit_compile=jit)
            float(fn(a, b))
            for _ in range(windows):
                calls, t0 = 0, time.perf_counter()
                while True:
                    float(fn(a, b))
                    calls += 1
                    elapsed = time.perf_counter() - t0
                    if elapsed >= seconds:
                        break
                rate = calls * 2 * n**3 / elapsed
                if rate > best:
                    best, how = rate, f"{n}x{n} matmul{', XLA' if jit else ''}"
    return best, how


def measure_peak(args, precision: str) -> dict:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    dtype = {"float32": tf.float32, "mixed_float16": tf.float16, "mixed_bfloat16": tf.bfloat16}[precision]
    sizes = [int(x) for x in args.matmul.split(",")] if args.matmul else ([4096, 8192] if gpus else [1024, 2048, 4096])
    rate, how = peak_flops(dtype, sizes)
    return {"precision": precision, "peak_flops": rate, "peak_how": how, "gpus": len(gpus)}


def gpu_name(gpus) -> str | None:
    if not gpus:
        return None
    import tensorflow as tf

    return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")


# ---- the grid, one process per setting ----------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        if args.one.startswith("peak:"):
            print("PEAK " + json.dumps(measure_peak(args, args.one.partition(":")[2])), flush=True)
            return 0
        model, size, precision, xla, replicas, source = args.one.split(":")
        row = measure(args, model, int(size), precision, xla == "on", int(replicas), source)
        print("ROW " + json.dumps(row), flush=True)
        return 0
    sources = args.input.split(",")
    unknown = sorted(set(sources) - {"memory", "pipeline", "pipeline_on_device"})
    if unknown:
        raise SystemExit(f"bench_train: --input={args.input}: use memory, pipeline and/or pipeline_on_device, "
                         f"not {', '.join(unknown)}.")
    allocators = args.cpu_allocators.split(",")
    unknown = sorted(set(allocators) - set(ALLOCATORS))
    if unknown:
        raise SystemExit(f"bench_train: --cpu_allocators={args.cpu_allocators}: use bfc and/or default, "
                         f"not {', '.join(unknown)}.")
    if set(sources) - {"memory"} and not args.data_dir:
        args.data_dir = prepared_voc(args)
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])
                   if not a.startswith(("--models", "--precisions", "--xla", "--replicas", "--json", "--input",
                                        "--data_dir", "--cpu_allocators", "--peak"))]
    if args.data_dir:
        passthrough.append(f"--data_dir={args.data_dir}")

    def child(one: str, allocator: str, tag: str):
        """Runs ``--one=...`` in a fresh process; its tagged JSON line, or the error's last lines."""
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                   TF_CPU_ALLOCATOR_USE_BFC=ALLOCATORS[allocator])
        result = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, *extra, f"--one={one}"],
                                capture_output=True, text=True, env=env, cwd=REPO)
        line = next((x for x in result.stdout.splitlines() if x.startswith(tag + " ")), None)
        if result.returncode or line is None:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            if result.returncode < 0:  # the table's cell shows the last line: say how it ended
                tail += f"\nkilled by signal {-result.returncode} ({signal.Signals(-result.returncode).name})"
            print(f"  failed (exit {result.returncode}):\n{tail}", file=sys.stderr)
            return None, tail
        return json.loads(line[len(tag) + 1:]), None

    extra: list[str] = []
    precisions = args.precisions.split(",")
    peaks = {}
    for precision in precisions:  # once per dtype, in its own process, before the rows
        print(f"peak FLOP/s, {precision} ...", file=sys.stderr, flush=True)
        peak, error = child(f"peak:{precision}", allocators[0], "PEAK")
        if peak is None:
            raise SystemExit(f"bench_train: the peak-FLOP measurement failed:\n{error}")
        peaks[precision] = peak
        print(f"  {peak['peak_flops'] / 1e9:.0f} GFLOP/s ({peak['peak_how']})", file=sys.stderr, flush=True)
    rows = []
    models = [(m.partition(":")[0], int(m.partition(":")[2] or args.size)) for m in args.models.split(",")]
    grid = [(m, z, p, x, r, i, c) for m, z in models for i in sources for p in precisions
            for x in args.xla.split(",") for r in args.replicas.split(",") for c in allocators]
    for n, (model, size, precision, xla, replicas, source, allocator) in enumerate(grid):
        print(f"[{n + 1}/{len(grid)}] model={model or '(gin)'} size={size} input={source} precision={precision} "
              f"xla={xla} replicas={replicas} cpu_allocator={allocator}", file=sys.stderr, flush=True)
        extra = [f"--peak={peaks[precision]['peak_flops']}"]
        row, error = child(f"{model}:{size}:{precision}:{xla}:{replicas}:{source}", allocator, "ROW")
        if row is None:
            rows.append({"model": model, "size": size, "input": source, "precision": precision, "xla": xla == "on",
                         "replicas": int(replicas), "cpu_allocator": allocator, "error": error})
            continue
        row["peak_how"] = peaks[precision]["peak_how"]
        rows.append(row)
        print(f"  segtrain {row['segtrain_images_per_s']:.1f} img/s, minimal {row['minimal_images_per_s']:.1f}, "
              f"ratio {row['segtrain_vs_minimal']:.3f}", file=sys.stderr, flush=True)
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


ALLOCATORS = {"bfc": "true", "default": "false"}


def prepared_voc(args) -> str:
    """A prepared voc2012 directory of ``--voc_images`` fabricated training images (in --workdir,
    reused when already there), made as benchmarks/bench_input.py makes its own."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, REPO)
    import bench_input

    from segtrain.data.prepare import prepare
    from segtrain.data.voc import Voc2012

    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="segtrain-bench-train-"))
    source_dir, data_dir = os.path.join(workdir, "raw"), os.path.join(workdir, "prepared")
    listed = os.path.join(source_dir, "VOCdevkit", "VOC2012", "ImageSets", "Segmentation", "trainval.txt")
    if not os.path.isfile(listed):
        t0 = time.perf_counter()
        made = bench_input.fabricate(source_dir, args.voc_images, 0)
        print(f"Fabricated {made['images']} VOC-like images in {time.perf_counter() - t0:.1f} s.", file=sys.stderr)
    prepare(Voc2012(), source_dir, data_dir, stream=sys.stderr)
    return data_dir


def table(rows: list[dict], args) -> str:
    ok = [r for r in rows if "error" not in r]
    head = ok[0] if ok else {}
    lines = [
        f"# bench_train  {datetime.date.today()}  batch={args.batch} "
        f"steps/call={args.steps} rounds={args.rounds}  device={head.get('device', '?')} ({os.cpu_count()} cores)",
        "",
        "| model | size | input | precision | xla | replicas | CPU allocator | segtrain img/s | minimal img/s "
        f"| fit img/s | segtrain/minimal | paired ratio, 95% interval | vs {args.target:g} "
        "| spread segtrain / minimal | segtrain/fit | GFLOP/img (train) | peak GFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model'] or '(gin)'} | {r.get('size', '')} | {r.get('input', '')} | {r['precision']} "
                         f"| {'on' if r['xla'] else 'off'} | {r['replicas']} | {r.get('cpu_allocator', '')} | failed: "
                         f"{r['error'].splitlines()[-1][:80] if r['error'] else '?'} ||||||||||")
            continue
        lines.append(
            f"| {r['model']} | {r['size']} | {r['input']} | {r['precision']} | {'on' if r['xla'] else 'off'} "
            f"| {r['replicas']} | {r['cpu_allocator']} "
            f"| {r['segtrain_images_per_s']:.1f} | {r['minimal_images_per_s']:.1f} | {_num(r['fit_images_per_s'], 1)} "
            f"| {r['segtrain_vs_minimal']:.3f} ({min(r['round_ratios']):.3f}-{max(r['round_ratios']):.3f}) "
            f"| {_interval(r.get('ratio_interval'))} | {verdict(r.get('ratio_interval'), args.target)} "
            f"| {_pct(r['segtrain_spread'])} / {_pct(r['minimal_spread'])} "
            f"| {_num(r['segtrain_vs_fit'], 3)} | {r['train_gflop_per_image']:.3f} "
            f"| {r['peak_gflop_per_s']:.0f} | {100 * r['mfu']:.1f}% |"
        )
    notes = sorted({f"- {r['model']} at {r['size']}x{r['size']}, not the {r['size_requested']} asked for: its "
                    f"input sides must be multiples of {r['size_divisor']}." for r in ok
                    if r["size"] != r["size_requested"]})
    notes += sorted({f"- peak {r['precision']}: {r['peak_gflop_per_s']:.0f} GFLOP/s, the best sustained "
                     f"rate ({r['peak_how']}) over 1 s windows." for r in ok if r["replicas"] == 1})
    notes += [f"- fit n/a ({r['precision']}, xla {'on' if r['xla'] else 'off'}, {r['replicas']} replicas): "
             f"{r['fit_error']}" for r in ok if r.get("fit_error")]
    if any(r.get("fit_steps_per_execution") == 1 and r["steps"] > 1 for r in ok):
        notes.append("- fit with several replicas runs 1 step per call: Keras 3.15's multi-step fit fails "
                     "under MirroredStrategy.")
    if any(r["fit_images_per_s"] is None and not r.get("fit_error") for r in ok):
        notes.append("- fit n/a where it was not run (--no-fit).")
    notes.append("- segtrain/minimal: the ratio of the median rounds, and in brackets the range of the "
                 "per-round ratios (each segtrain round against the minimal round next to it).")
    notes.append("- paired ratio: the geometric mean of the per-round ratios and its 95% interval (Student's t "
                 "over their logs; the loops alternate which runs first in a round). vs the target: met when "
                 "the interval lies above it, below when under it, else unsettled (run more rounds).")
    notes.append("- spread: (slowest round - fastest round) / median round, of each loop.")
    return "\n".join(lines + ([""] + notes if notes else []))


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _interval(interval) -> str:
    return "n/a" if interval is None else f"{interval[0]:.3f} ({interval[1]:.3f}-{interval[2]:.3f})"


def _num(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
