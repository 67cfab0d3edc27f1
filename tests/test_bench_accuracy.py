"""benchmarks/bench_accuracy.py: time to a test mIoU, over seeds, with evaluation time left out."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_accuracy.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # trains and evaluates in a subprocess: the full tier
def test_a_tiny_run_end_to_end_writes_a_curve_without_evaluation_time(tmp_path):
    out = tmp_path / "accuracy.json"
    tiny = ["datasets.shapes.num_train=32", "datasets.shapes.num_validation=4", "datasets.shapes.num_test=4",
            "models.unet.base_filters=4", "models.unet.depth=2", "train.batch_size=4", "train.num_image_panels=0"]
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, SCRIPT, "--variants=colour_free", "--seeds=1", "--steps=4", "--every=2",
         f"--json={out}", *(f"--gin_param={b}" for b in tiny)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    wall = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert (run["recipe"], run["variant"], run["seed"], run["steps"]) == ("quickstart", "colour_free", 1, 4)
    assert "datasets.shapes.random_colours = True" in run["bindings"] and "train.seed = 1" in run["bindings"]
    curve = run["curve"]
    assert [p["step"] for p in curve] == [2, 4]
    seconds = [p["seconds"] for p in curve]
    assert 0 < seconds[0] < seconds[1] and all(0 <= p["mean_iou"] <= 1 for p in curve)
    # The seconds leave out the test evaluations and the recipe's validation (one pass, at the end).
    assert run["eval_s"] > 0 and run["validations"] == 1 and run["validation_s"] > 0
    assert seconds[-1] <= run["fit_s"] - run["eval_s"] - run["validation_s"] + 1e-6
    assert seconds[-1] < run["wall_s"] < wall
    assert run["steps_per_loop"] == 2 and run["recipe_steps_per_loop"] == 20
    (summary,) = result["summary"]
    assert summary["thresholds"]["0.75"]["of"] == 1 and summary["final_mean_iou"]["mean"] == run["final_mean_iou"]
    # The report: header with the command and the machine, the tables, progress on stderr.
    assert "# bench_accuracy" in done.stdout and "--steps=4" in done.stdout and "cores" in done.stdout
    assert "| quickstart | colour_free | 1 |" in done.stdout and "| 4 |" in done.stdout
    assert "[run 1/1] quickstart colour_free seed 1: step 2/4" in done.stderr


def _row(recipe, seed, curve, steps=600):
    points = [{"step": s, "seconds": t, "mean_iou": m} for s, t, m in curve]
    return {"recipe": recipe, "variant": "shapes", "seed": seed, "curve": points, "steps": points[-1]["step"],
            "num_steps": steps, "train_s": points[-1]["seconds"], "final_mean_iou": points[-1]["mean_iou"],
            "steps_per_loop": 10, "recipe_steps_per_loop": 20, "every": 50, "eval_s": 1.0, "validation_s": 2.0,
            "validations": 2, "wall_s": 100.0}


def test_summary_gives_mean_and_range_over_the_seeds_that_reached_a_threshold():
    bench = _bench()
    rows = [_row("quickstart", 0, [(50, 10.0, 0.5), (100, 20.0, 0.8), (150, 30.0, 0.9)]),
            _row("quickstart", 1, [(50, 12.0, 0.6), (100, 24.0, 0.76), (150, 36.0, 0.8)]),
            _row("quickstart", 2, [(50, 11.0, 0.4), (100, 22.0, 0.7)]),
            {"recipe": "quickstart", "variant": "shapes", "seed": 3, "error": "boom"}]
    (entry,) = bench.summarise(rows, [0.75, 0.85])
    assert entry["seeds"] == [0, 1, 2] and entry["failed_seeds"] == [3]
    low, high = entry["thresholds"]["0.75"], entry["thresholds"]["0.85"]
    assert (low["reached"], low["of"]) == (2, 3) and low["seconds"] == {"mean": 22.0, "min": 20.0, "max": 24.0}
    assert (high["reached"], high["seconds"]["mean"]) == (1, 30.0)
    assert entry["final_mean_iou"]["min"] == 0.7 and entry["final_mean_iou"]["max"] == 0.9
    assert [p["runs"] for p in entry["curve"]] == [3, 3, 2]
    table = bench.report({"command": "python benchmarks/bench_accuracy.py", "date": "2026-12-02",
                          "machine": "cpu, 2 cores", "thresholds": [0.75, 0.85], "every": 50, "stop_at": None,
                          "summary": [entry], "runs": rows})
    assert "| quickstart | shapes | 3 (1 failed) | 22 (20-24) | 2/3 | 30 (30-30) | 1/3 |" in table
    assert "not reached in 100 steps / 22 s" in table and "failed: boom" in table
    assert "| 150 | 33 s / 0.850 [2] |" in table
    assert "train.steps_per_loop = 10 (the recipe's 20)" in table


def test_recipes_are_the_quickstart_plus_bindings_and_gin_files(tmp_path):
    bench = _bench()
    assert bench.parse_recipe("quickstart")["gin_files"] == [bench.QUICKSTART]
    extra = tmp_path / "more.gin"
    extra.write_text("train.num_steps = 10\n")
    recipe = bench.parse_recipe(f"dilated:models.unet.bottleneck_dilations = (2, 4); {extra}")
    assert recipe == {"name": "dilated", "gin_files": [bench.QUICKSTART, str(extra)],
                      "bindings": ["models.unet.bottleneck_dilations = (2, 4)"]}
    with pytest.raises(SystemExit, match="NAME:gin binding"):
        bench.parse_recipe("dilated")
