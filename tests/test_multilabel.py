"""Multi-label and binary segmentation: label bits, per-label counts and metrics, sigmoid losses
(each against a NumPy transcription), and a multi-label run end to end (train, evaluate,
predict, export, explain)."""

from __future__ import annotations

import json
import os

import gin
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from registry import LOSSES
from segtrain import metrics
from segtrain.data.info import DatasetInfo
from segtrain.errors import SegtrainError
from segtrain.losses import build_loss
from segtrain.task import Task, label_palette, pack, pack_np, unpack, unpack_np
from tests.conftest import TINY, segtrain_main

IGNORE = 255
L = 3


def _data(seed=0, b=3, h=6, w=7, n=L, ignore_frac=0.2):
    """Packed multi-label labels with ignored pixels, and logits [B,H,W,L]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2 ** n, size=(b, h, w))
    labels[rng.random((b, h, w)) < ignore_frac] = IGNORE
    logits = (rng.normal(size=(b, h, w, n)) * 2).astype(np.float32)
    return labels.astype(np.int32), logits


def _bits(labels, n=L):
    """NumPy: [..., n] 0/1 of each label, ignored pixels all 0, and the valid mask."""
    valid = labels != IGNORE
    return ((np.where(valid, labels, 0)[..., None] >> np.arange(n)) & 1).astype(np.float64), valid


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# -- labels as bits, counts, metrics

def test_bits_pack_and_unpack_both_ways():
    values = np.arange(8)
    bits = unpack_np(values, 3)
    assert bits[5].tolist() == [1, 0, 1] and bits[6].tolist() == [0, 1, 1]
    np.testing.assert_array_equal(pack_np(bits.astype(bool)), values)
    np.testing.assert_array_equal(unpack(values, 3).numpy(), bits)
    np.testing.assert_array_equal(pack(bits).numpy(), values)


def test_per_label_counts_match_numpy_and_leave_ignored_pixels_out():
    labels, logits = _data(seed=1)
    task = Task(L, IGNORE, multilabel=True, threshold=0.6)
    predictions = task.predict(logits).numpy()
    truth, valid = _bits(labels)
    predicted = (_sigmoid(logits) > 0.6).astype(int)
    np.testing.assert_array_equal(predictions, (predicted << np.arange(L)).sum(-1))
    expected = np.zeros((L, 2, 2), np.int64)
    for i in range(L):
        for t in (0, 1):
            for p in (0, 1):
                expected[i, t, p] = np.sum(valid & (truth[..., i] == t) & (predicted[..., i] == p))
    np.testing.assert_array_equal(task.counts(labels, predictions).numpy(), expected)
    assert expected.sum() == valid.sum() * L


def test_metrics_read_per_label_counts_label_by_label():
    rng = np.random.default_rng(2)
    cm = rng.integers(0, 50, size=(4, 2, 2)).astype(np.int64)
    cm[3] = [[40, 0], [0, 0]]  # a label neither true nor predicted anywhere
    tp, fp, fn, tn = cm[:, 1, 1], cm[:, 0, 1], cm[:, 1, 0], cm[:, 0, 0]
    seen = slice(0, 3)
    iou = tp[seen] / (tp + fp + fn)[seen]
    got = metrics.compute(cm, ("pixel_accuracy", "mean_accuracy", "mean_iou", "per_class_iou", "dice"))
    np.testing.assert_allclose(got["per_class_iou"][:3], iou)
    assert np.isnan(got["per_class_iou"][3])
    np.testing.assert_allclose(got["mean_iou"], iou.mean())
    np.testing.assert_allclose(got["mean_accuracy"], (tp[seen] / (tp + fn)[seen]).mean())
    np.testing.assert_allclose(got["dice"], (2 * tp[seen] / (2 * tp + fp + fn)[seen]).mean())
    np.testing.assert_allclose(got["pixel_accuracy"], (tp + tn).sum() / cm.sum())


def test_a_rare_foreground_never_predicted_scores_zero_not_nan():
    # Binary: one label, foreground on 0.5% of the pixels, a model that predicts none of it.
    labels = np.zeros((2, 50, 20), np.int32)
    labels[0, :2, :5] = 1
    task = Task(1, multilabel=True)
    cm = task.counts(labels, task.predict(np.full((2, 50, 20, 1), -3.0, np.float32))).numpy()
    got = metrics.compute(cm)
    assert got["mean_iou"] == 0.0 and got["dice"] == 0.0 and got["mean_accuracy"] == 0.0
    assert got["per_class_iou"] == [0.0] and got["pixel_accuracy"] == pytest.approx(0.995)


def test_test_time_logits_give_back_the_averaged_probabilities():
    task = Task(L, multilabel=True)
    p = np.array([0.0, 0.2, 0.5, 0.9, 1.0], np.float32)
    np.testing.assert_allclose(tf.sigmoid(task.logits_of(p)).numpy(), p, atol=1e-6)


def test_label_palette_mixes_the_colours_of_the_labels_present():
    table = label_palette([(255, 0, 0), (0, 0, 255)], 255)
    assert table[0].tolist() == [0, 0, 0] and table[1].tolist() == [255, 0, 0]
    assert table[3].tolist() == [128, 0, 128] and table[255].tolist() == [255, 255, 255]


def test_bad_multilabel_settings_are_named():
    with pytest.raises(SegtrainError, match="has 8 labels; .* 1 to 7 labels"):
        DatasetInfo(8, multilabel=True, name="toy")
    with pytest.raises(SegtrainError, match="the ignore label 5 is a combination of its 3 labels"):
        DatasetInfo(3, ignore_label=5, multilabel=True, name="toy")
    with pytest.raises(SegtrainError, match=r"inference.threshold=1.5"):
        Task(2, multilabel=True, threshold=1.5)


# -- sigmoid losses against NumPy

def _np_bce(labels, logits, eps=0.0):
    truth, valid = _bits(labels)
    truth = truth * (1 - eps) + eps / 2
    x = logits.astype(np.float64)
    per = np.maximum(x, 0) - x * truth + np.log1p(np.exp(-np.abs(x)))
    per_pixel = per.mean(-1)
    return np.array([per_pixel[i][valid[i]].mean() if valid[i].any() else 0.0 for i in range(len(labels))])


def _np_tversky(labels, logits, alpha, beta, smooth=1.0):
    truth, valid = _bits(labels)
    p = _sigmoid(logits) * valid[..., None]
    truth = truth * valid[..., None]
    tp, fp, fn = ((p * truth).sum((1, 2)), (p * (1 - truth)).sum((1, 2)), ((1 - p) * truth).sum((1, 2)))
    return 1 - ((tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean(-1)


def _np_focal(labels, logits, gamma, alpha):
    truth, valid = _bits(labels)
    p = _sigmoid(logits)
    p_t = np.where(truth == 1, p, 1 - p)
    a_t = np.where(truth == 1, alpha, 1 - alpha)
    per_pixel = (-a_t * (1 - p_t) ** gamma * np.log(p_t)).mean(-1)
    return np.array([per_pixel[i][valid[i]].mean() for i in range(len(labels))])


def _np_lovasz_hinge(labels, logits):
    """Per example, the mean over labels of Berman et al.'s Algorithm 1 on the hinge errors, with
    the Jaccard loss of every prefix computed directly."""
    truth, valid = _bits(labels)
    out = []
    for b in range(len(labels)):
        per_label = []
        for i in range(truth.shape[-1]):
            t = truth[b][..., i][valid[b]]
            errors = 1 - logits[b][..., i][valid[b]].astype(np.float64) * (2 * t - 1)
            order = np.argsort(-errors, kind="stable")
            e, g = errors[order], t[order]
            jaccard = []
            for k in range(1, len(g) + 1):
                inter = g.sum() - g[:k].sum()
                union = g.sum() + (1 - g[:k]).sum()
                jaccard.append(1 - inter / union)
            grad = np.diff(np.concatenate([[0.0], jaccard]))
            per_label.append(np.dot(np.maximum(e, 0), grad))
        out.append(np.mean(per_label))
    return np.array(out)


def _multilabel(name, **config):
    return LOSSES.get(name)(ignore_label=IGNORE, multilabel=True, **config)


@pytest.mark.parametrize("name, config, reference", [
    ("cross_entropy", {}, lambda y, x: _np_bce(y, x)),
    ("cross_entropy", {"label_smoothing": 0.2}, lambda y, x: _np_bce(y, x, 0.2)),
    ("dice", {}, lambda y, x: _np_tversky(y, x, 0.5, 0.5)),
    ("tversky", {"alpha": 0.3, "beta": 0.7}, lambda y, x: _np_tversky(y, x, 0.3, 0.7)),
    ("focal", {"gamma": 2.0, "alpha": 0.25}, lambda y, x: _np_focal(y, x, 2.0, 0.25)),
    ("lovasz_hinge", {}, _np_lovasz_hinge),
])
def test_sigmoid_losses_match_numpy_ignore_pixels_and_have_gradients(name, config, reference):
    labels, logits = _data(seed=3)
    loss = _multilabel(name, **config)
    np.testing.assert_allclose(loss(labels, logits).numpy(), reference(labels, logits), rtol=1e-5, atol=1e-6)
    traced = tf.function(loss, input_signature=[tf.TensorSpec([None, None, None], tf.int32),
                                                tf.TensorSpec([None, None, None, L], tf.float32)])
    np.testing.assert_allclose(traced(labels, logits).numpy(), reference(labels, logits), rtol=1e-5, atol=1e-6)
    noisy = logits.copy()
    noisy[labels == IGNORE] = 40.0
    np.testing.assert_allclose(loss(labels, noisy).numpy(), loss(labels, logits).numpy(), rtol=1e-5, atol=1e-6)
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(loss(labels, variable))
    grad = tape.gradient(value, variable).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0 and np.all(grad[labels == IGNORE] == 0)


def test_softmax_only_losses_are_refused_for_multilabel_data_by_name():
    with pytest.raises(SegtrainError, match=r"train.loss='lovasz_softmax' scores one class per pixel .* dataset "
                                            r"'toy' is multi-label .* cross_entropy, .*lovasz_hinge"):
        build_loss("lovasz_softmax", IGNORE, multilabel=True, dataset="toy")
    with pytest.raises(SegtrainError, match="lovasz_hinge' is for multi-label and binary datasets"):
        build_loss("lovasz_hinge", IGNORE)
    labels, logits = _data(seed=4)
    with gin.unlock_config():
        gin.bind_parameter("losses.combined.weights", {"cross_entropy": 1.0, "dice": 2.0})
    both = build_loss("combined", IGNORE, multilabel=True)(labels, logits).numpy()
    np.testing.assert_allclose(both, _np_bce(labels, logits) + 2 * _np_tversky(labels, logits, 0.5, 0.5), rtol=1e-5)


# -- a multi-label run end to end

@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    """The tiny run on `shapes` with multilabel (3 labels), its default loss (binary cross-entropy)."""
    from segtrain.commands.configure import parse_config
    from segtrain.train.trainer import train

    root = tmp_path_factory.mktemp("multilabel")
    gin.clear_config()
    parse_config(["gin/datasets/shapes_multilabel.gin"], TINY)
    train(str(root / "run"))
    gin.clear_config()
    from segtrain.data.shapes import shapes

    ds, _ = shapes("test", multilabel=True, num_test=2, min_size=32, max_size=40)
    os.makedirs(root / "images")
    for i, example in enumerate(ds):
        Image.fromarray(example["image"].numpy()).save(root / "images" / f"shape_{i}.png")
    return root


@pytest.mark.slow  # trains, or builds models several times: the full tier
def test_a_multilabel_run_trains_and_evaluates_per_label(multilabel_run):
    run = str(multilabel_run / "run")
    in_run = json.load(open(os.path.join(run, "eval_results_validation.json")))
    assert in_run["class_names"] == ["circle", "rectangle", "triangle"]
    assert np.asarray(in_run["confusion_matrix"]).shape == (3, 2, 2)
    result = segtrain_main("evaluate", f"--model_dir={run}", "--gin_param=inference.threshold = 0.3")
    assert result.returncode == 0, result.stderr
    results = json.load(open(os.path.join(run, "eval_results.json")))
    assert results["inference"] == "whole, threshold 0.3"
    cm = np.asarray(results["confusion_matrix"])
    assert cm.shape == (3, 2, 2) and all(np.isfinite(v) for v in results["per_class_iou"])
    np.testing.assert_allclose(results["mean_iou"], np.mean(results["per_class_iou"]))
    assert os.path.exists(os.path.join(run, "confusion_matrix.png"))


@pytest.mark.slow
def test_predict_writes_label_bits_one_mask_per_label_and_sigmoids(multilabel_run):
    run, out = str(multilabel_run / "run"), str(multilabel_run / "predicted")
    result = segtrain_main("predict", f"--model_dir={run}", f"--input={multilabel_run / 'images'}",
                           f"--output={out}", "--probabilities")
    assert result.returncode == 0, result.stderr
    bits = np.asarray(Image.open(os.path.join(out, "shape_0.png")))
    probs = np.load(os.path.join(out, "shape_0_probabilities.npy"))
    assert probs.shape == (*bits.shape, 3) and probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_array_equal(bits, pack_np(probs > 0.5))
    for i, name in enumerate(("circle", "rectangle", "triangle")):
        mask = np.asarray(Image.open(os.path.join(out, f"shape_0_{name}.png")))
        np.testing.assert_array_equal(mask, ((bits >> i) & 1) * 255)
    assert json.load(open(os.path.join(out, "predictions.json")))["multilabel"] is True
    refused = segtrain_main("predict", f"--model_dir={run}", f"--input={multilabel_run / 'images'}",
                            f"--output={out}2", "--postprocess=dense_crf")
    assert refused.returncode != 0 and "this model is multi-label" in refused.stderr


@pytest.mark.slow
def test_export_serves_label_bits_as_the_checkpoint_predicts_them(multilabel_run):
    run, export = str(multilabel_run / "run"), str(multilabel_run / "export")
    result = segtrain_main("export", f"--model_dir={run}", f"--output={export}", "--probabilities")
    assert result.returncode == 0, result.stderr
    metadata = json.load(open(os.path.join(export, "segtrain_export.json")))
    assert metadata["multilabel"] is True and metadata["threshold"] == 0.5
    assert metadata["check"]["label_agreement"] == 1.0
    served = tf.saved_model.load(export).signatures["serving_default"]
    image = np.asarray(Image.open(multilabel_run / "images" / "shape_0.png"))[None]
    outputs = {k: v.numpy() for k, v in served(images=tf.constant(image)).items()}
    np.testing.assert_allclose(outputs["probabilities"], _sigmoid(outputs["logits"]), atol=1e-5)
    np.testing.assert_array_equal(outputs["labels"], pack_np(outputs["probabilities"] > 0.5))
    out = str(multilabel_run / "predicted_export")
    assert segtrain_main("predict", f"--export={export}", f"--input={multilabel_run / 'images'}",
                         f"--output={out}").returncode == 0
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, "shape_0.png"))), outputs["labels"][0])


@pytest.mark.slow
def test_explain_targets_the_pixels_that_carry_the_label(multilabel_run):
    run, out = str(multilabel_run / "run"), str(multilabel_run / "explained")
    result = segtrain_main("explain", f"--model_dir={run}", f"--input={multilabel_run / 'images' / 'shape_0.png'}",
                           "--class=rectangle", f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert os.path.exists(os.path.join(out, "shape_0_rectangle_gradcam.png"))


@pytest.mark.slow
def test_a_binary_folder_with_a_rare_foreground_evaluates_to_finite_metrics_before_training(tmp_path):
    """Binary masks of 0 and 255 (labels='channels', one label), foreground on ~1% of the pixels:
    the untrained model's first evaluation gives numbers, not NaN, and its foreground IoU."""
    from segtrain.commands.configure import parse_config
    from segtrain.experiment import Experiment

    rng = np.random.default_rng(0)
    for name in ("images", "masks"):
        os.makedirs(tmp_path / name)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), np.uint8)).save(tmp_path / "images" / f"s{i}.png")
        mask = np.zeros((24, 32), np.uint8)
        mask[i:i + 2, 5:9] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"s{i}.png")
    gin.clear_config()
    parse_config([], [*TINY, "train.dataset = 'folder'", "train.eval_split = 'train'",
                      f"datasets.folder.source_dir = '{tmp_path}'", "datasets.folder.labels = 'channels'",
                      "datasets.folder.class_names = ['spot']", "datasets.folder.split_ratios = (1, 0, 0)"])
    experiment = Experiment()
    assert experiment.info.multilabel and experiment.info.num_classes == 1
    results, cm = experiment.evaluator().run(experiment.eval_dataset())
    assert cm.shape == (1, 2, 2) and cm[0, 1].sum() == 4 * 8
    for name in ("loss", "pixel_accuracy", "mean_accuracy", "mean_iou", "dice"):
        assert np.isfinite(results[name]), (name, results)
    assert results["per_class_iou"][0] == pytest.approx(cm[0, 1, 1] / (cm[0, 1, 1] + cm[0, 0, 1] + cm[0, 1, 0]))
