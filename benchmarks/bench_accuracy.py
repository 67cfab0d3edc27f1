#!/usr/bin/env python3
"""Time to accuracy: training seconds until the test mean IoU reaches 0.75 and 0.85, over seeds.

    python benchmarks/bench_accuracy.py                                   # quickstart, both variants, seeds 0,1,2
    python benchmarks/bench_accuracy.py --recipe=quickstart \\
        --recipe='dilated:models.unet.bottleneck_dilations = (2, 4)' --json=accuracy.json

A run is (recipe, variant, seed), trained by segtrain itself (Experiment, Trainer.fit: the loop
and every action of `segtrain train`) in its own process, so no TensorFlow state carries over.

  recipe   ``quickstart`` is gin/quickstart.gin as is. ``--recipe='NAME:BINDING;BINDING'`` is the
           quickstart plus gin bindings (and gin files: a part ending in .gin), e.g.
           ``--recipe='dilated:models.unet.bottleneck_dilations = (2, 4)'``.
  variant  ``shapes`` (each class has its colour) or ``colour_free``
           (``datasets.shapes.random_colours = True``: only geometry separates the classes).
           Both have the same images' geometry and labels; the dataset seed stays 0.
  seed     ``train.seed``: weight initialisation, shuffling and augmentation.

Every ``--every`` steps (and at the last step) an action added to the run evaluates the current
weights on the ``test`` split, whole images, with segtrain's Evaluator as `segtrain evaluate`
does, and records a point (training seconds, step, test mIoU). The seconds to a threshold are
those of the first point at or above it, so they are resolved to ``--every`` steps.

What the training seconds count: wall-clock time from the call of Trainer.fit, so the input
pipeline's start, the first window's tracing, checkpoints, summaries and image panels are in;
model and optimizer construction are not (``setup_s``). They leave out the time of the test
evaluations this benchmark adds, and also the time of the recipe's own in-training validation
passes (the quickstart validates at steps 300 and 600), which is reported apart
(``validation_s``): a validation pass does not change the weights, and its cost depends on
``train.eval_every`` and the validation split's size, not on how fast a recipe learns, so
recipes that validate more or less often compare on their training alone. A `segtrain train`
run to a point takes its training seconds plus the validation seconds before it.

The windows must end at the evaluation steps: when ``--every`` is not a multiple of
``train.steps_per_loop`` (the quickstart's 20), the runs train with ``steps_per_loop`` set to
the greatest common divisor of the two, and the output says so. ``--steps`` changes
``train.num_steps`` and so the length of the learning-rate schedule too.

It prints a markdown table per (recipe, variant) with the mean and min-max over seeds of the
seconds to each threshold (and how many seeds reached it) and of the final test mIoU, the runs
one by one, and the mean curves. Progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import segtrain.cli  # noqa: E402,F401  the runs get the segtrain command's TensorFlow environment (CPU allocator)
QUICKSTART = os.path.join(REPO, "gin", "quickstart.gin")
VARIANTS = {"shapes": [], "colour_free": ["datasets.shapes.random_colours = True"]}
PROGRESS = "[run "  # the children's progress lines start so; the parent passes them on


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", action="append", default=None,
                   help="'quickstart', or 'NAME:gin binding;gin binding;extra.gin' (the quickstart plus those); "
                        "repeatable (default: quickstart)")
    p.add_argument("--variants", default="shapes,colour_free", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma list of train.seed values")
    p.add_argument("--steps", type=int, default=None, help="train.num_steps (default: the recipe's)")
    p.add_argument("--every", type=int, default=50, help="evaluate the test split every this many steps")
    p.add_argument("--thresholds", default="0.75,0.85", help="test mIoU thresholds to time")
    p.add_argument("--stop_at", type=float, default=None,
                   help="end a run once its test mIoU reaches this (default: train every step)")
    p.add_argument("--gin_param", action="append", default=[], help="gin bindings for every run (they win)")
    p.add_argument("--workdir", default=None, help="keep the runs' directories and logs here (default: a temporary "
                                                   "directory, removed at the end)")
    p.add_argument("--json", default=None, help="also write everything (runs, curves, summary) to this JSON file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run, its spec as JSON
    args = p.parse_args(argv)
    if args.every < 1 or (args.steps is not None and args.steps < 1):
        p.error("--every and --steps must be >= 1")
    args.thresholds_list = sorted(float(t) for t in args.thresholds.split(",") if t)
    return args


def parse_recipe(text: str) -> dict:
    """``'quickstart'`` or ``'NAME:part;part'`` -> {'name', 'gin_files', 'bindings'}; a part ending in
    .gin is a gin file, read after gin/quickstart.gin."""
    if text == "quickstart":
        return {"name": "quickstart", "gin_files": [QUICKSTART], "bindings": []}
    name, sep, rest = text.partition(":")
    if not sep or not name.strip() or not rest.strip():
        raise SystemExit(f"bench_accuracy: --recipe={text!r}: use quickstart or NAME:gin binding;gin binding.")
    parts = [x.strip() for x in rest.split(";") if x.strip()]
    files = [x for x in parts if x.endswith(".gin") and "=" not in x]
    for path in files:
        if not os.path.isfile(path):
            raise SystemExit(f"bench_accuracy: --recipe={text!r}: no gin file {path}.")
    return {"name": name.strip(), "gin_files": [QUICKSTART, *map(os.path.abspath, files)],
            "bindings": [x for x in parts if x not in files]}


# ---- one run, in its own process -----------------------------------------------------------
def measure(spec: dict) -> dict:
    """Trains one (recipe, variant, seed) with Trainer.fit and the test-mIoU action; returns its row."""
    import warnings

    t_setup = time.perf_counter()
    warnings.simplefilter("ignore")  # the CPU speed warnings: this is what is measured
    import gin
    import tensorflow as tf

    from segtrain.commands.configure import parse_config
    from segtrain.experiment import Experiment, ExperimentConfig
    from segtrain.runtime.distribute import build_strategy
    from segtrain.train.loop import Action, due
    from segtrain.train.trainer import Trainer

    class ValidationTimed(Experiment):
        """The experiment, with the in-training validation's passes timed (Trainer.fit builds its
        evaluator through ``evaluator()``)."""

        validation_s, validations = 0.0, 0

        def evaluator(self, inference=None):
            evaluator = super().evaluator(inference)
            run = evaluator.run

            def timed(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return run(*args, **kwargs)
                finally:
                    self.validation_s += time.perf_counter() - t0
                    self.validations += 1

            evaluator.run = timed
            return evaluator

    class TestMeanIoU(Action):
        """Every ``every`` steps: the test mIoU, and the training seconds so far without the time of
        these evaluations and of the validation passes; asks to stop at ``stop_at``."""

        def __init__(self, experiment, every: int, stop_at, t0: float):
            self.experiment, self.every, self.stop_at, self.t0 = experiment, every, stop_at, t0
            self.evaluator = Experiment.evaluator(experiment)  # untimed: it is this action's own
            self.dataset = experiment.eval_dataset("test")
            self.eval_s, self.points = 0.0, []

        def __call__(self, window):
            if not due(window, self.every):
                return False
            now = time.perf_counter()
            seconds = now - self.t0 - self.eval_s - self.experiment.validation_s
            results, _ = self.evaluator.run(self.dataset, label="test")
            self.eval_s += time.perf_counter() - now
            miou = float(results["mean_iou"])
            self.points.append({"step": window.step, "seconds": seconds, "mean_iou": miou,
                                "validation_s": self.experiment.validation_s, "eval_s": self.eval_s})
            print(f"{spec['label']}: step {window.step}/{num_steps}  test mIoU {miou:.4f}  {seconds:.1f} s",
                  file=sys.stderr, flush=True)
            return self.stop_at is not None and miou >= self.stop_at

    recipe = spec["recipe"]
    bindings = [*recipe["bindings"], *VARIANTS[spec["variant"]], f"train.seed = {spec['seed']}"]
    if spec["steps"] is not None:
        bindings.append(f"train.num_steps = {spec['steps']}")
    parse_config(recipe["gin_files"], [*bindings, *spec["gin_param"]])
    recipe_steps_per_loop = ExperimentConfig().steps_per_loop
    if spec["every"] % recipe_steps_per_loop:
        gin.bind_parameter("train.steps_per_loop", math.gcd(spec["every"], recipe_steps_per_loop))
    strategy = build_strategy()  # distribute.* in gin: one device on a CPU, as `segtrain train`
    config = ExperimentConfig()
    num_steps = config.num_steps
    experiment = ValidationTimed(config, strategy, split=config.train_split)
    trainer = Trainer(experiment, spec["model_dir"])
    # The test pipeline and evaluator are built before the clock starts; their first pass (tracing)
    # is in the excluded evaluation time.
    action = TestMeanIoU(experiment, spec["every"], spec["stop_at"], t0=0.0)
    action.t0 = t0 = time.perf_counter()
    setup_s = t0 - t_setup
    try:
        trainer.fit([action])
    finally:
        trainer.write_dir.cleanup()
    fit_s = time.perf_counter() - t0
    if not action.points:
        raise RuntimeError(f"{spec['label']}: no step was trained (train.num_steps={num_steps}).")
    last = action.points[-1]
    import keras

    return {
        "recipe": recipe["name"], "variant": spec["variant"], "seed": spec["seed"],
        "num_steps": num_steps, "steps": last["step"], "stopped_early": last["step"] < num_steps,
        "steps_per_loop": config.steps_per_loop, "recipe_steps_per_loop": recipe_steps_per_loop,
        "every": spec["every"], "model": config.model, "batch_size": config.batch_size,
        "train_s": last["seconds"], "final_mean_iou": last["mean_iou"],
        "eval_s": action.eval_s, "validation_s": experiment.validation_s, "validations": experiment.validations,
        "fit_s": fit_s, "setup_s": setup_s, "parameters": int(trainer.model.count_params()),
        "curve": action.points, "tensorflow": tf.__version__, "keras": keras.__version__,
        "device": _device(tf),
        "gin_files": [os.path.relpath(f, REPO) for f in recipe["gin_files"]], "bindings": bindings + spec["gin_param"],
    }


def _device(tf) -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return "CPU"


# ---- the grid, one process per run ---------------------------------------------------------
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one:
        with open(args.one) as f:
            spec = json.load(f)
        row = measure(spec)
        with open(spec["out"], "w") as f:
            json.dump(row, f)
        return 0
    recipes = [parse_recipe(r) for r in (args.recipe or ["quickstart"])]
    if len({r["name"] for r in recipes}) < len(recipes):
        raise SystemExit("bench_accuracy: two --recipe share a name; give each its own.")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"bench_accuracy: --variants={args.variants}: use {' and/or '.join(VARIANTS)}.")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    grid = [(r, v, s) for r in recipes for v in variants for s in seeds]
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="segtrain-bench-accuracy-")
    os.makedirs(workdir, exist_ok=True)
    command = "python benchmarks/bench_accuracy.py" + (" " + shlex.join(argv) if argv else "")
    rows, started, interrupted = [], time.perf_counter(), False

    def result() -> dict:
        return {"command": command, "date": str(datetime.date.today()), "machine": machine(rows),
                "thresholds": args.thresholds_list, "every": args.every, "stop_at": args.stop_at,
                "runs_planned": len(grid), "wall_s": time.perf_counter() - started,
                "summary": summarise(rows, args.thresholds_list), "runs": rows}

    try:
        for k, (recipe, variant, seed) in enumerate(grid, start=1):
            label = f"{PROGRESS}{k}/{len(grid)}] {recipe['name']} {variant} seed {seed}"
            rows.append(run_one(args, recipe, variant, seed, label, os.path.join(
                workdir, f"{recipe['name']}-{variant}-seed{seed}")))
            if args.json:  # after every run, so a long grid cut short keeps what it measured
                write_json(args.json, result())
    except KeyboardInterrupt:
        interrupted = True
        print(f"bench_accuracy: interrupted after {len(rows)} of {len(grid)} runs; reporting those.",
              file=sys.stderr, flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    final = result()
    print(report(final))
    if args.json:
        write_json(args.json, final)
    return 0 if rows and not interrupted and all("error" not in r for r in rows) else 1


def write_json(path: str, value: dict) -> None:
    """Writes ``value`` to ``path`` through a temporary name, so the file is never half-written."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def run_one(args, recipe: dict, variant: str, seed: int, label: str, model_dir: str) -> dict:
    """One run in a fresh process; its progress lines pass on to stderr, the rest goes to its log."""
    shutil.rmtree(model_dir, ignore_errors=True)  # a run always starts from step 0
    os.makedirs(model_dir)
    spec = {"recipe": recipe, "variant": variant, "seed": seed, "steps": args.steps, "every": args.every,
            "stop_at": args.stop_at, "gin_param": args.gin_param, "label": label,
            "model_dir": os.path.join(model_dir, "run"), "out": os.path.join(model_dir, "row.json")}
    spec_path = os.path.join(model_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    print(f"{label}: starting", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tail = collections.deque(maxlen=8)
    with open(os.path.join(model_dir, "log.txt"), "w") as log:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--one={spec_path}"], cwd=REPO,
                                 stdout=log, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")))
        for line in child.stderr:
            log.write(line)
            if line.startswith(PROGRESS):
                sys.stderr.write("  " + line)
                sys.stderr.flush()
            elif line.strip():
                tail.append(line.rstrip())
        code = child.wait()
    wall_s = time.perf_counter() - t0
    if code or not os.path.exists(spec["out"]):
        error = "\n".join(tail) or f"exit status {code}"
        print(f"{label}: failed (exit {code}):\n{error}", file=sys.stderr, flush=True)
        return {"recipe": recipe["name"], "variant": variant, "seed": seed, "error": error, "wall_s": wall_s}
    with open(spec["out"]) as f:
        row = json.load(f)
    row["wall_s"] = wall_s
    print(f"{label}: done, final test mIoU {row['final_mean_iou']:.4f} at step {row['steps']}, "
          f"{row['train_s']:.0f} s training, {wall_s:.0f} s in all", file=sys.stderr, flush=True)
    return row


def time_to(curve: list[dict], threshold: float) -> dict | None:
    """The first point of ``curve`` at or above ``threshold`` (None: not reached)."""
    return next((p for p in curve if p["mean_iou"] >= threshold), None)


def _spread(values: list[float]) -> dict | None:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)} if values else None


def summarise(rows: list[dict], thresholds: list[float]) -> list[dict]:
    """Per (recipe, variant): mean and range over seeds of the seconds (and steps) to each threshold
    among the seeds that reached it, and of the final mIoU; the mean curve by step."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["variant"]), []).append(r)
    out = []
    for (recipe, variant), runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        entry = {"recipe": recipe, "variant": variant, "seeds": [r["seed"] for r in ok],
                 "failed_seeds": [r["seed"] for r in runs if "error" in r], "thresholds": {}}
        for t in thresholds:
            hits = [p for p in (time_to(r["curve"], t) for r in ok) if p]
            entry["thresholds"][str(t)] = {"reached": len(hits), "of": len(ok),
                                           "seconds": _spread([p["seconds"] for p in hits]),
                                           "steps": _spread([float(p["step"]) for p in hits])}
        entry["final_mean_iou"] = _spread([r["final_mean_iou"] for r in ok if r["final_mean_iou"] is not None])
        entry["train_s"] = _spread([r["train_s"] for r in ok if r["train_s"] is not None])
        entry["steps"] = sorted({r["steps"] for r in ok})
        by_step: dict[int, list[dict]] = {}
        for r in ok:
            for p in r["curve"]:
                by_step.setdefault(p["step"], []).append(p)
        entry["curve"] = [{"step": step, "runs": len(ps), "seconds": statistics.fmean(p["seconds"] for p in ps),
                           "mean_iou": _spread([p["mean_iou"] for p in ps])} for step, ps in sorted(by_step.items())]
        out.append(entry)
    return out


def machine(rows: list[dict]) -> str:
    """CPU model and cores, the accelerator, and the TensorFlow and Keras versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ok = next((r for r in rows if "error" not in r), {})
    device = ok.get("device", "?")
    return (f"{cpu}, {cores} cores{'' if device == 'CPU' else f', {device}'}; Python {platform.python_version()}, "
            f"tensorflow {ok.get('tensorflow', '?')}, keras {ok.get('keras', '?')}")


def _range(s: dict | None, digits: int, unit: str = "") -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def report(result: dict) -> str:
    thresholds, rows = result["thresholds"], result["runs"]
    lines = [f"# bench_accuracy  {result['date']}  {result['machine']}  `{result['command']}`", "",
             f"Test mIoU every {result['every']} steps (whole images, test split); seconds: training only, "
             "without those evaluations and the recipe's validation passes.", ""]
    head = "| recipe | variant | seeds |" + "".join(f" s to {t} mean (range) | reached |" for t in thresholds)
    lines += [head + " final test mIoU mean (range) | steps | training s mean (range) |",
              "|---|---|---:|" + "---:|---:|" * len(thresholds) + "---:|---:|---:|"]
    for e in result["summary"]:
        cells = "".join(f" {_range(e['thresholds'][str(t)]['seconds'], 0)} | {e['thresholds'][str(t)]['reached']}/"
                        f"{e['thresholds'][str(t)]['of']} |" for t in thresholds)
        steps = ",".join(map(str, e["steps"])) or "-"
        lines.append(f"| {e['recipe']} | {e['variant']} | {len(e['seeds'])}"
                     f"{' (' + str(len(e['failed_seeds'])) + ' failed)' if e['failed_seeds'] else ''} |{cells} "
                     f"{_range(e['final_mean_iou'], 3)} | {steps} | {_range(e['train_s'], 0)} |")
    lines += ["", "Runs:", "",
              "| recipe | variant | seed |" + "".join(f" to {t} |" for t in thresholds)
              + " final test mIoU | steps | training s | test eval s | validation s (passes) | wall s |",
              "|---|---|---:|" + "---|" * len(thresholds) + "---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['variant']} | {r['seed']} | failed: "
                         f"{r['error'].splitlines()[-1][:100]} |" + " |" * (len(thresholds) + 5))
            continue
        cells = ""
        for t in thresholds:
            p = time_to(r["curve"], t)
            cells += (f" {p['seconds']:.0f} s (step {p['step']}) |" if p else
                      f" not reached in {r['steps']} steps / {r['train_s']:.0f} s |")
        lines.append(f"| {r['recipe']} | {r['variant']} | {r['seed']} |{cells} {r['final_mean_iou']:.4f} "
                     f"| {r['steps']} | {r['train_s']:.1f} | {r['eval_s']:.1f} | {r['validation_s']:.1f} "
                     f"({r['validations']}) | {r['wall_s']:.0f} |")
    summary = [e for e in result["summary"] if e["curve"]]
    if summary:
        lines += ["", "Mean curves (mean training s / mean test mIoU at each step; [k] where only k seeds "
                  "got that far):", "",
                  "| step |" + "".join(f" {e['recipe']} {e['variant']} |" for e in summary),
                  "|---:|" + "---:|" * len(summary)]
        for step in sorted({p["step"] for e in summary for p in e["curve"]}):
            cells = ""
            for e in summary:
                p = next((p for p in e["curve"] if p["step"] == step), None)
                if p is None:
                    cells += " |"
                    continue
                fewer = "" if p["runs"] == len(e["seeds"]) else f" [{p['runs']}]"
                cells += f" {p['seconds']:.0f} s / {p['mean_iou']['mean']:.3f}{fewer} |"
            lines.append(f"| {step} |{cells}")
    notes = sorted({f"- {r['recipe']}: trained with train.steps_per_loop = {r['steps_per_loop']} (the recipe's "
                    f"{r['recipe_steps_per_loop']}), so that windows end every {r['every']} steps." for r in rows
                    if "error" not in r and r["steps_per_loop"] != r["recipe_steps_per_loop"]})
    if len(rows) < result.get("runs_planned", len(rows)):
        notes.append(f"- Only {len(rows)} of the {result['runs_planned']} planned runs ran (interrupted).")
    if result["stop_at"] is not None:
        notes.append(f"- Runs stopped once their test mIoU reached {result['stop_at']}.")
    return "\n".join(lines + ([""] + notes if notes else []))


if __name__ == "__main__":
    sys.exit(main())
