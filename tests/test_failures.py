"""The failure views, each against an independent transcription in plain Python / NumPy loops:
per-image IoU, boundary IoU, IoU by object size, the calibration error, temperature scaling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segtrain import failures
from segtrain.task import Task


def blobs(rng, h, w, num_classes, count=6):
    """A label map of rectangles and discs of random classes on class 0."""
    out = np.zeros([h, w], np.int64)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(count):
        c = int(rng.integers(1, num_classes))
        y, x, r = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(1, 9))
        if rng.random() < 0.5:
            out[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = c
        else:
            out[max(0, y - r):y + r, max(0, x - r):x + r] = c
    return out


def noisy_logits(rng, truth, num_classes, flip=0.15, scale=3.0):
    """Logits that mostly agree with the truth: a one-hot, some pixels moved, plus noise."""
    target = np.where(rng.random(truth.shape) < flip, rng.integers(0, num_classes, truth.shape), truth)
    target = np.where(truth == 255, 0, target)
    return scale * np.eye(num_classes)[target] + rng.normal(0, 1.0, [*truth.shape, num_classes])


# ---- the transcriptions ---------------------------------------------------------------------
def ref_boundary(mask, d):
    """Pixels of the mask whose (2d+1)^2 square (outside: background) is not all mask."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            inside = True
            for dy in range(-d, d + 1):
                for dx in range(-d, d + 1):
                    yy, xx = y + dy, x + dx
                    if not (0 <= yy < h and 0 <= xx < w) or not mask[yy, xx]:
                        inside = False
            out[y, x] = not inside
    return out


def ref_components(mask):
    """Connected regions (8 neighbours) by breadth-first search: a list of pixel sets."""
    h, w = mask.shape
    seen, regions = set(), []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and (y, x) not in seen:
                queue, region = [(y, x)], set()
                seen.add((y, x))
                while queue:
                    cy, cx = queue.pop()
                    region.add((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and (ny, nx) not in seen:
                                seen.add((ny, nx))
                                queue.append((ny, nx))
                regions.append(region)
    return regions


def ref_views(truths, predictions, probs, num_classes, names, ratio=0.02, sizes=(32 ** 2, 96 ** 2), bins=15):
    images, b_inter, b_union = [], [0] * num_classes, [0] * num_classes
    objects = {s: [[] for _ in range(num_classes)] for s in ("small", "medium", "large")}
    count, conf, correct = [0] * bins, [0.0] * bins, [0.0] * bins
    for truth, pred, prob in zip(truths, predictions, probs):
        valid = truth != 255
        ious = []
        for c in range(num_classes):
            t, p = (truth == c) & valid, (pred == c) & valid
            union = int((t | p).sum())
            if union:
                ious.append((t & p).sum() / union)
        images.append(float(np.mean(ious)) if ious else 1.0)
        d = max(1, int(round(ratio * math.hypot(*truth.shape))))
        for c in range(num_classes):
            t, p = (truth == c) & valid, (pred == c) & valid
            bt, bp = ref_boundary(t, d), ref_boundary(p, d)
            b_inter[c] += int((bt & bp).sum())
            b_union[c] += int((bt | bp).sum())
            if names[c] == "background":
                continue
            pieces = ref_components(p)
            for region in ref_components(t):
                matched = set().union(*[q for q in pieces if q & region]) if pieces else set()
                iou = len(region & matched) / len(region | matched)
                size = "small" if len(region) < sizes[0] else "medium" if len(region) < sizes[1] else "large"
                objects[size][c].append(iou)
        for y in range(truth.shape[0]):
            for x in range(truth.shape[1]):
                if not valid[y, x]:
                    continue
                top = float(prob[y, x].max())
                k = min(int(top * bins), bins - 1)
                count[k] += 1
                conf[k] += top
                correct[k] += float(int(np.argmax(prob[y, x])) == truth[y, x])
    total = sum(count)
    ece = sum(abs(correct[k] - conf[k]) for k in range(bins) if count[k]) / total
    boundary = [b_inter[c] / b_union[c] for c in range(num_classes) if b_union[c]]
    return images, float(np.mean(boundary)), objects, ece


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_every_view_matches_its_transcription():
    rng = np.random.default_rng(3)
    names = ["background", "a", "b", "c"]
    task = Task(4)
    truths, logits = [], []
    for shape in ((40, 52), (36, 36), (48, 30)):
        truth = blobs(rng, *shape, 4)
        truth[:3, :5] = 255  # some ignored pixels
        truths.append(truth)
        logits.append(noisy_logits(rng, truth, 4))
    views = failures.Failures(task, names, worst=2, object_sizes=(20, 120))
    for i, (t, lg) in enumerate(zip(truths, logits)):
        views.add(i, t, lg)
    probs = [softmax(lg) for lg in logits]
    preds = [np.argmax(p, -1) for p in probs]
    images, boundary, objects, ece = ref_views(truths, preds, probs, 4, names, sizes=(20, 120))
    got = views.results()
    assert [x[0] for x in sorted(views.images, key=lambda x: x[1])] == pytest.approx(images)
    assert got["worst_images"] == [{"index": i, "iou": pytest.approx(images[i])} for i in np.argsort(images)[:2]]
    assert got["boundary_iou"] == pytest.approx(boundary)
    for size in ("small", "medium", "large"):
        every = [v for per in objects[size] for v in per]
        assert got["iou_by_size"][size]["objects"] == len(every) > 0 if size != "large" else True
        if every:
            assert got["iou_by_size"][size]["mean_iou"] == pytest.approx(np.mean(every))
        assert got["iou_by_size"][size]["per_class_objects"] == [len(v) for v in objects[size]]
        assert got["iou_by_size"][size]["per_class_objects"][0] == 0  # background has no objects
    assert got["ece"] == pytest.approx(ece)
    assert sum(got["reliability"]["count"]) == sum(int((t != 255).sum()) for t in truths)


def test_boundary_of_a_square_and_a_whole_image():
    mask = np.zeros([9, 9], bool)
    mask[2:7, 2:7] = True
    ring = failures.boundary(mask, 1)
    assert ring.sum() == 25 - 9 and not ring[4, 4]
    assert failures.boundary(mask, 2).sum() == 24 and (failures.boundary(mask, 3) == mask).all()
    full = np.ones([5, 5], bool)  # the image's border is a contour: outside counts as background
    assert (failures.boundary(full, 1) == ref_boundary(full, 1)).all() and failures.boundary(full, 1).sum() == 16


def test_a_perfect_model_scores_one_and_a_blurred_contour_costs_boundary_iou_more():
    rng = np.random.default_rng(0)
    truth = blobs(rng, 64, 64, 3, count=4)
    perfect = failures.Failures(Task(3), ["background", "a", "b"])
    perfect.add(0, truth, 10.0 * np.eye(3)[truth])
    r = perfect.results()
    assert r["boundary_iou"] == 1.0 and r["worst_images"][0]["iou"] == 1.0
    assert all(r["iou_by_size"][s]["mean_iou"] in (1.0,) or r["iou_by_size"][s]["objects"] == 0
               for s in ("small", "medium", "large"))
    from scipy import ndimage

    grown = truth.copy()  # each object one pixel larger all round: mean IoU falls a little, boundary IoU a lot
    for c in (1, 2):
        grown[ndimage.binary_dilation(truth == c) & (truth == 0)] = c
    blurred = failures.Failures(Task(3), ["background", "a", "b"])
    blurred.add(0, truth, 10.0 * np.eye(3)[grown])
    b = blurred.results()
    assert b["boundary_iou"] < b["worst_images"][0]["iou"] < 1.0


def test_multilabel_views_read_bits():
    rng = np.random.default_rng(1)
    task = Task(2, multilabel=True)
    a, b = blobs(rng, 32, 32, 2) > 0, blobs(rng, 32, 32, 2) > 0
    truth = a.astype(np.int64) | (b.astype(np.int64) << 1)
    logits = np.stack([np.where(a, 4.0, -4.0), np.where(b, -4.0, 4.0)], -1)  # label 0 right, label 1 inverted
    views = failures.Failures(task, ["a", "b"])
    views.add(0, truth, logits)
    r = views.results()
    assert r["per_class_boundary_iou"][0] == 1.0 and r["per_class_boundary_iou"][1] < 0.2
    p = 1 / (1 + np.exp(-4.0))
    # Every decision has confidence p; label 0's are right, label 1's wrong.
    assert r["ece"] == pytest.approx(abs(0.5 - p))


def test_temperature_scaling_finds_the_temperature_that_made_the_labels():
    """Labels drawn from softmax(z / 2.5): the fitted temperature is close to 2.5, and it is the
    grid's minimum of an NLL written out directly."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4.0, [20000, 5])
    p = softmax(z / 2.5)
    labels = np.array([rng.choice(5, p=row) for row in p])
    task = Task(5)
    sample = failures.PixelSample(task, capacity=15000, seed=1)
    sample.add(labels.reshape(100, 200), z.reshape(100, 200, 5))
    assert sample.logits.shape == (15000, 5) and sample.seen == 20000
    t, before, after = failures.fit_temperature(sample.logits, sample.labels, task)
    assert t == pytest.approx(2.5, rel=0.1) and after < before

    def ref_nll(temperature):
        total = 0.0
        for row, y in zip(sample.logits.astype(np.float64), sample.labels):
            scaled = row / temperature
            total -= scaled[y] - math.log(sum(math.exp(v) for v in scaled))
        return total / len(sample.labels)

    grid = [t * f for f in (0.9, 0.97, 1.0, 1.03, 1.1)]
    values = [ref_nll(g) for g in grid]
    assert min(values) == pytest.approx(values[2], rel=1e-4)
    assert after == pytest.approx(values[2], rel=1e-6)


def test_multilabel_temperature_and_ignored_pixels_are_left_out():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 3.0, [4000, 2])
    y = (rng.random(x.shape) < 1 / (1 + np.exp(-x / 0.5))).astype(np.int64)
    packed = y[:, 0] | (y[:, 1] << 1)
    packed[:500] = 255
    task = Task(2, multilabel=True)
    sample = failures.PixelSample(task)
    sample.add(packed, x)
    assert sample.labels.size == 3500 and 255 not in sample.labels
    t, _, _ = failures.fit_temperature(sample.logits, sample.labels, task)
    assert t == pytest.approx(0.5, rel=0.15)


@pytest.mark.slow
def test_evaluate_writes_the_views_calibrates_and_predict_applies_the_temperature(trained_run, tmp_path):
    """The whole path on a trained run: evaluate --calibrate writes calibration.json, the views in
    eval_results.json, the panels and the reliability diagram, TensorBoard's evaluate/; predict
    --calibrated writes the probabilities of logits / T, with the same masks."""
    import json
    import os

    from tests.conftest import copy_run, read_tags, segtrain_main

    run = copy_run(trained_run, tmp_path / "run")
    result = segtrain_main("evaluate", f"--model_dir={run}", "--calibrate", "--worst=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Where the model fails on 'test' (8 images)" in result.stdout and "Temperature " in result.stdout
    calibration = json.load(open(os.path.join(run, "calibration.json")))
    assert calibration["split"] == "validation" and calibration["nll_calibrated"] <= calibration["nll"]
    views = json.load(open(os.path.join(run, "eval_results.json")))["failures"]
    assert views["images"] == 8 and len(views["worst_images"]) == 3
    assert views["temperature"] == calibration["temperature"] and "ece_calibrated" in views
    assert set(views["iou_by_size"]) == {"small", "medium", "large"}
    worst = sorted(f for f in os.listdir(os.path.join(run, "failures")) if f.startswith("worst_"))
    assert len(worst) == 3 and worst[0].startswith("worst_01_image_") and "reliability.png" in os.listdir(
        os.path.join(run, "failures"))
    tags = read_tags(os.path.join(run, "evaluate"))
    assert {"test/boundary_iou", "test/ece", "test/ece_calibrated"} <= tags
    assert any(t.startswith("test/worst_images") for t in tags) and any(t.startswith("test/reliability") for t in tags)

    from segtrain.data.shapes import shapes
    from segtrain.images import write_image

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, example in enumerate(shapes("test", min_size=32, max_size=40, num_test=2)[0].take(2)):
        write_image(str(inputs / f"s{i}.png"), example["image"].numpy())
    outs = {}
    for name, extra in (("plain", []), ("calibrated", ["--calibrated"])):
        out = tmp_path / name
        result = segtrain_main("predict", f"--model_dir={run}", f"--input={inputs}", f"--output={out}",
                               "--probabilities", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[name] = out
    probs = sorted(f for f in os.listdir(outs["plain"]) if f.endswith(".npy"))
    assert probs
    t = calibration["temperature"]
    for f in probs:
        plain, calibrated = np.load(outs["plain"] / f), np.load(outs["calibrated"] / f)
        # softmax(log p / T) from the plain probabilities is the calibrated one.
        expected = softmax(np.log(np.clip(plain, 1e-30, 1)) / t)
        assert np.allclose(calibrated, expected, atol=1e-4)
    masks = sorted(f for f in os.listdir(outs["plain"]) if f.endswith(".png"))
    for f in masks:
        assert open(outs["plain"] / f, "rb").read() == open(outs["calibrated"] / f, "rb").read()
    # An export made with --calibrated serves the calibrated probabilities and says so.
    result = segtrain_main("export", f"--model_dir={run}", f"--output={tmp_path / 'export'}", "--calibrated",
                           "--probabilities")
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.load(open(tmp_path / "export" / "segtrain_export.json"))
    assert metadata["temperature"] == pytest.approx(t)
    from segtrain.export.runtime import load

    exported = load(str(tmp_path / "export"))
    assert exported.task.temperature == pytest.approx(t)


def test_calibrated_without_a_calibration_is_one_message(trained_run, tmp_path):
    from tests.conftest import assert_user_error, copy_run, segtrain_main

    run = copy_run(trained_run, tmp_path / "run")
    assert_user_error(segtrain_main("export", f"--model_dir={run}", f"--output={tmp_path / 'e'}", "--calibrated"),
                      "calibration.json not found", "segtrain evaluate", "--calibrate")


def test_views_of_a_split_without_objects_are_written_as_json_null(tmp_path):
    import json

    from segtrain.evaluation import write_results

    views = failures.Failures(Task(2), ["background", "a"])
    views.add(0, np.zeros([8, 8], np.int64), np.zeros([8, 8, 2]))  # no object of any size
    path = tmp_path / "r.json"
    write_results(str(path), {"failures": views.results()})
    loaded = json.loads(path.read_text())  # strict JSON: no NaN
    assert loaded["failures"]["iou_by_size"]["small"]["mean_iou"] is None
