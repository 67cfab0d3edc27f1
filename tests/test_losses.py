"""Losses: per-example values, ignore label out of sum and normaliser, checked against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from registry import LOSSES
from segtrain.errors import SegtrainError

IGNORE = 255


def _data(seed=0, b=3, h=6, w=7, c=4, ignore_frac=0.2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=(b, h, w))
    labels[rng.random((b, h, w)) < ignore_frac] = IGNORE
    logits = rng.normal(size=(b, h, w, c)).astype(np.float32) * 2
    return labels.astype(np.int32), logits


def _np_log_softmax(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_ce(labels, logits, weights=None):
    logp = _np_log_softmax(logits.astype(np.float64))
    out = []
    for i in range(labels.shape[0]):
        valid = labels[i] != IGNORE
        lab = labels[i][valid]
        ce = -logp[i][valid, lab]
        if weights is not None:
            ce = ce * np.asarray(weights)[lab]
        out.append(ce.sum() / max(valid.sum(), 1))
    return np.array(out)


def _loss(name, **config):
    return LOSSES.get(name)(ignore_label=IGNORE, **config)


def test_cross_entropy_matches_numpy_per_example():
    labels, logits = _data()
    got = _loss("cross_entropy")(labels, logits).numpy()
    assert got.shape == (3,)
    np.testing.assert_allclose(got, _np_ce(labels, logits), rtol=1e-5)


@pytest.mark.parametrize("name", ["cross_entropy", "dice", "focal", "boundary_weighted_cross_entropy"])
def test_ignored_pixels_do_not_count(name):
    labels, logits = _data(seed=1)
    loss = _loss(name)
    base = loss(labels, logits).numpy()
    # Whatever the model predicts at ignored pixels, the loss is the same.
    noisy = logits.copy()
    noisy[labels == IGNORE] = 50.0
    np.testing.assert_allclose(loss(labels, noisy).numpy(), base, rtol=1e-5)
    # And the normaliser counts valid pixels only: an example made of one valid row equals
    # that row alone.
    lab = np.full((1, 4, 5), IGNORE, np.int32)
    lab[0, 0] = [0, 1, 2, 3, 1]
    alone = loss(lab[:, :1], logits[:1, :1, :5]).numpy()
    padded = loss(lab, np.concatenate([logits[:1, :1, :5], logits[:1, 1:4, :5]], axis=1)).numpy()
    np.testing.assert_allclose(padded, alone, rtol=1e-5)


def test_example_without_valid_pixels_has_zero_loss():
    labels = np.full((2, 4, 4), IGNORE, np.int32)
    labels[1] = 1
    logits = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    for name in ("cross_entropy", "dice", "focal", "boundary_weighted_cross_entropy"):
        values = _loss(name)(labels, logits).numpy()
        assert values[0] == 0.0 and np.isfinite(values).all(), name


def test_weighted_cross_entropy_fixed_weights():
    labels, logits = _data(seed=2)
    weights = [0.5, 1.0, 2.0, 4.0]
    got = _loss("weighted_cross_entropy", class_weights=weights)(labels, logits).numpy()
    np.testing.assert_allclose(got, _np_ce(labels, logits, weights), rtol=1e-5)


def test_weighted_cross_entropy_per_batch_inverse_frequency():
    labels, logits = _data(seed=3, c=3)
    labels[labels == 2] = 0  # class 2 absent from the batch
    valid = labels[labels != IGNORE]
    counts = np.bincount(valid, minlength=3).astype(float)
    present = counts > 0
    weights = np.where(present, valid.size / (present.sum() * np.maximum(counts, 1)), 0)
    got = _loss("weighted_cross_entropy", class_weights="batch")(labels, logits).numpy()
    np.testing.assert_allclose(got, _np_ce(labels, logits, weights), rtol=1e-5)


def test_weighted_cross_entropy_needs_weights():
    with pytest.raises(SegtrainError, match="class_weights"):
        _loss("weighted_cross_entropy")


def test_dice_over_present_classes_matches_numpy():
    labels, logits = _data(seed=4)
    labels[0][labels[0] == 3] = 1  # example 0 has no class 3
    got = _loss("dice", smooth=1.0)(labels, logits).numpy()
    probs = np.exp(_np_log_softmax(logits.astype(np.float64)))
    expected = []
    for i in range(labels.shape[0]):
        valid = labels[i] != IGNORE
        scores = []
        for c in range(4):
            truth = (labels[i] == c) & valid
            if not truth.any():
                continue
            p = probs[i][..., c] * valid
            scores.append((2 * (p * truth).sum() + 1) / (p.sum() + truth.sum() + 1))
        expected.append(1 - np.mean(scores))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_perfect_prediction_has_near_zero_dice_and_ce():
    labels = np.random.default_rng(5).integers(0, 3, size=(2, 8, 8)).astype(np.int32)
    logits = np.eye(3, dtype=np.float32)[labels] * 30
    assert _loss("dice")(labels, logits).numpy().max() < 1e-3
    assert _loss("cross_entropy")(labels, logits).numpy().max() < 1e-3


def test_focal_with_gamma_zero_is_cross_entropy_and_focuses_on_hard_pixels():
    labels, logits = _data(seed=6)
    np.testing.assert_allclose(
        _loss("focal", gamma=0.0)(labels, logits).numpy(), _np_ce(labels, logits), rtol=1e-5
    )
    assert np.all(_loss("focal", gamma=2.0)(labels, logits).numpy() < _np_ce(labels, logits))
    weights = [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_allclose(
        _loss("focal", gamma=0.0, alpha=weights)(labels, logits).numpy(),
        _np_ce(labels, logits, weights), rtol=1e-5,
    )


def test_combined_is_the_weighted_sum_of_registered_losses():
    labels, logits = _data(seed=7)
    combined = _loss("combined", weights={"cross_entropy": 1.0, "dice": 0.5})(labels, logits).numpy()
    expected = _loss("cross_entropy")(labels, logits).numpy() + 0.5 * _loss("dice")(labels, logits).numpy()
    np.testing.assert_allclose(combined, expected, rtol=1e-5)


def test_combined_from_gin(configure):
    configure("losses.combined.weights = {'cross_entropy': 2.0, 'focal': 1.0}", "losses.focal.gamma = 0.0", tiny=False)
    labels, logits = _data(seed=8)
    got = LOSSES.get("combined")(ignore_label=IGNORE)(labels, logits).numpy()
    np.testing.assert_allclose(got, 3 * _np_ce(labels, logits), rtol=1e-5)


def test_losses_have_gradients_wrt_logits():
    labels, logits = _data(seed=9)
    logits = tf.Variable(logits)
    for name in ("cross_entropy", "dice", "focal", "boundary_weighted_cross_entropy"):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(_loss(name)(labels, logits))
        grad = tape.gradient(value, logits).numpy()
        assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
        assert np.all(grad[labels == IGNORE] == 0), name


def _two_objects(h=20, w=30, gap=3):
    """Background with two rectangles of class 1 ``gap`` pixels apart, one class-2 square far
    away, and a few ignored pixels."""
    label = np.zeros((h, w), np.int32)
    label[4:16, 3:12] = 1
    label[4:16, 12 + gap:12 + gap + 8] = 1
    label[h - 3:, w - 3:] = 2
    label[0, :3] = IGNORE
    return label


def _np_border_weights(label, w0=10.0, sigma=5.0):
    """The U-Net separation term, directly: every object's distance map over the whole image."""
    from scipy import ndimage

    maps = []
    for c in (1, 2):
        components, n = ndimage.label(label == c, structure=np.ones((3, 3)))
        maps += [ndimage.distance_transform_edt(components != i) for i in range(1, n + 1)]
    d = np.sort(np.stack(maps), axis=0)
    return np.where(label == 0, w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2)), 0.0)


def test_unet_border_weights_match_numpy_and_peak_between_close_objects():
    from segtrain.losses import unet_border_weights

    label = _two_objects()
    got = unet_border_weights(label, w0=10.0, sigma=5.0, ignore_label=IGNORE)
    np.testing.assert_allclose(got, _np_border_weights(label), atol=2e-3)
    gap, far = got[10, 13], got[19, 0]
    assert gap > 5.0 and far < 0.05, (gap, far)  # between the two: d1 + d2 = 4
    assert (got[label != 0] == 0).all()
    # One object alone has no neighbour to be kept apart from.
    alone = np.zeros((12, 12), np.int32)
    alone[3:6, 3:6] = 1
    assert not unet_border_weights(alone).any()


def test_boundary_weighted_cross_entropy_matches_numpy():
    label = _two_objects()
    labels = np.stack([label, np.where(label == 2, 0, label)])
    logits = np.random.default_rng(10).normal(size=labels.shape + (3,)).astype(np.float32)
    border = np.stack([_np_border_weights(x, w0=8.0, sigma=3.0) for x in labels])
    for class_weights in (None, [0.5, 2.0, 1.0]):
        wc = np.ones(3) if class_weights is None else np.asarray(class_weights)
        got = _loss("boundary_weighted_cross_entropy", w0=8.0, sigma=3.0, class_weights=class_weights)
        logp = _np_log_softmax(logits.astype(np.float64))
        expected = []
        for i in range(2):
            valid = labels[i] != IGNORE
            lab = np.where(valid, labels[i], 0)
            ce = -np.take_along_axis(logp[i], lab[..., None], -1)[..., 0]
            expected.append((ce * (wc[lab] + border[i]) * valid).sum() / valid.sum())
        np.testing.assert_allclose(got(labels, logits).numpy(), expected, rtol=1e-4)
        np.testing.assert_allclose(tf.function(got)(labels, logits).numpy(), expected, rtol=1e-4)


def test_boundary_loss_traces_with_unknown_sizes_and_refuses_xla():
    loss = _loss("boundary_weighted_cross_entropy")
    traced = tf.function(loss, input_signature=[tf.TensorSpec([None, None, None], tf.int32),
                                                tf.TensorSpec([None, None, None, 3], tf.float32)])
    label = _two_objects()[None]
    logits = np.zeros(label.shape + (3,), np.float32)
    np.testing.assert_allclose(traced(label, logits).numpy(), loss(label, logits).numpy(), rtol=1e-5)
    # SciPy on the host cannot join an XLA cluster: the error names the setting to change.
    with pytest.raises(Exception, match=r"computes its weight map on the host with SciPy.*set train\.xla = False"):
        tf.function(loss, jit_compile=True)(label, logits)
    with pytest.raises(SegtrainError, match="sigma > 0"):
        _loss("boundary_weighted_cross_entropy", sigma=0)


# -- label smoothing, hard-pixel mining, Lovasz-softmax --------------------------------------------

def _np_smoothed_ce_pixels(labels, logits, eps):
    """Per-example lists of the valid pixels' smoothed cross-entropies, pixel by pixel."""
    logp = _np_log_softmax(logits.astype(np.float64))
    c = logits.shape[-1]
    out = []
    for i in range(labels.shape[0]):
        values = []
        for y, x in zip(*np.nonzero(labels[i] != IGNORE)):
            target = np.full(c, eps / c)
            target[labels[i, y, x]] += 1.0 - eps
            values.append(-(target * logp[i, y, x]).sum())
        out.append(np.array(values))
    return out


def _np_top_k_mean(values, share):
    if not len(values):
        return 0.0
    k = int(np.ceil(share * len(values)))
    return np.sort(values)[::-1][:k].mean()


@pytest.mark.parametrize("eps,share", [(0.1, 1.0), (0.0, 0.25), (0.2, 0.1)])
def test_label_smoothing_and_top_k_pixels_match_numpy(eps, share):
    labels, logits = _data(seed=11)
    labels[2] = IGNORE  # an example with nothing to learn from
    got = _loss("cross_entropy", label_smoothing=eps, top_k_percent_pixels=share)(labels, logits).numpy()
    expected = [_np_top_k_mean(v, share) for v in _np_smoothed_ce_pixels(labels, logits, eps)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    weights = np.array([0.5, 1.0, 2.0, 4.0])
    weighted = _loss("weighted_cross_entropy", class_weights=list(weights), label_smoothing=eps,
                     top_k_percent_pixels=share)(labels, logits).numpy()
    per_pixel = _np_smoothed_ce_pixels(labels, logits, eps)
    expected = [_np_top_k_mean(v * weights[labels[i][labels[i] != IGNORE]], share) for i, v in enumerate(per_pixel)]
    np.testing.assert_allclose(weighted, expected, rtol=1e-5)


def test_cross_entropy_options_are_checked():
    with pytest.raises(SegtrainError, match=r"losses.cross_entropy.top_k_percent_pixels=0 must be in \(0, 1\]"):
        _loss("cross_entropy", top_k_percent_pixels=0)
    with pytest.raises(SegtrainError, match=r"losses.weighted_cross_entropy.label_smoothing=1.0 must be in \[0, 1\)"):
        _loss("weighted_cross_entropy", class_weights=[1.0], label_smoothing=1.0)
    with pytest.raises(SegtrainError, match="losses.lovasz_softmax.classes='some'"):
        _loss("lovasz_softmax", classes="some")


def _np_lovasz_softmax(labels, logits, classes="present"):
    """Berman et al.'s Algorithm 1 on each example's valid pixels, class by class."""
    probs = np.exp(_np_log_softmax(logits.astype(np.float64)))
    out = []
    for i in range(labels.shape[0]):
        valid = labels[i] != IGNORE
        lab, p = labels[i][valid], probs[i][valid]
        losses = []
        for c in range(logits.shape[-1]):
            fg = (lab == c).astype(np.float64)
            if classes == "present" and not fg.any():
                continue
            errors = np.abs(fg - p[:, c])
            order = np.argsort(-errors, kind="stable")
            fg_sorted = fg[order]
            gts = fg_sorted.sum()
            jaccard = np.empty(len(fg_sorted))
            for n in range(len(fg_sorted)):  # the Jaccard loss of the first n + 1 pixels predicted c
                inter = gts - fg_sorted[: n + 1].sum()
                union = gts + (1 - fg_sorted[: n + 1]).sum()
                jaccard[n] = 1 - inter / union
            grad = np.diff(jaccard, prepend=0.0)
            losses.append(float(errors[order] @ grad))
        out.append(np.mean(losses) if losses else 0.0)
    return np.array(out)


@pytest.mark.parametrize("classes", ["present", "all"])
def test_lovasz_softmax_matches_numpy(classes):
    labels, logits = _data(seed=12, c=3)
    labels[0][labels[0] == 2] = 1  # example 0 has no class 2
    labels[2] = IGNORE
    loss = _loss("lovasz_softmax", classes=classes)
    np.testing.assert_allclose(loss(labels, logits).numpy(), _np_lovasz_softmax(labels, logits, classes), rtol=1e-5)
    traced = tf.function(loss, input_signature=[tf.TensorSpec([None, None, None], tf.int32),
                                                tf.TensorSpec([None, None, None, 3], tf.float32)])
    np.testing.assert_allclose(traced(labels, logits).numpy(), _np_lovasz_softmax(labels, logits, classes), rtol=1e-5)
    perfect = np.eye(3, dtype=np.float32)[np.where(labels == IGNORE, 0, labels)] * 30
    assert loss(labels, perfect).numpy().max() < 1e-3


def test_new_losses_ignore_pixels_and_have_gradients():
    labels, logits = _data(seed=13)
    for name, config in (("lovasz_softmax", {}), ("cross_entropy", {"top_k_percent_pixels": 0.3, "label_smoothing": 0.1})):
        loss = _loss(name, **config)
        noisy = logits.copy()
        noisy[labels == IGNORE] = 50.0
        np.testing.assert_allclose(loss(labels, noisy).numpy(), loss(labels, logits).numpy(), rtol=1e-5)
        variable = tf.Variable(logits)
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(loss(labels, variable))
        grad = tape.gradient(value, variable).numpy()
        assert np.isfinite(grad).all() and np.abs(grad).sum() > 0 and np.all(grad[labels == IGNORE] == 0), name
