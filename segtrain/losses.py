"""Loss plugins: ``fn(ignore_label=255, **config) -> loss(labels, logits) -> [B]``.

``labels`` are int [B,H,W], ``logits`` float [B,H,W,C]. Pixels whose label is the ignore
label are left out of both the sum and the normaliser; an example with no valid pixel has
loss 0. The trainer turns the per-example losses into the global-batch mean.

A factory that also takes ``class_statistics`` receives the training split's pixel counts per
class (``ClassStatistics``, recorded by `segtrain prepare`), from which it can derive class
weights; ``build_loss`` passes them only to factories that accept them.

Multi-label (and binary) datasets (segtrain.task) have labels packed as bits and one sigmoid
logit per label. A factory that takes ``multilabel`` serves them: ``build_loss`` passes
``multilabel=True`` for such a dataset, and refuses a loss whose factory does not take it. The
sigmoid forms: cross_entropy (binary cross-entropy per label), dice and tversky (soft, per
label), focal (sigmoid focal loss), lovasz_hinge (multi-label only), combined.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from scipy import ndimage

from registry import LOSSES
from segtrain import compat
from segtrain.errors import SegtrainError, warn
from segtrain.task import unpack

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
# Class weights computed from the training split's statistics.
DATA_WEIGHTS = ("median_frequency", "inverse_frequency")


@dataclasses.dataclass(frozen=True)
class ClassStatistics:
    """Pixel statistics of the split a loss is trained on.

    Attributes:
      class_names: one name per class.
      pixel_counts: pixels of each class (ignore-label pixels not counted), or None when the
        dataset has none recorded.
      image_pixels: for each class, the labelled pixels of the images the class appears in.
      split, dataset: where the counts come from, for messages.
    """

    class_names: Sequence[str]
    pixel_counts: Sequence[int] | None = None
    image_pixels: Sequence[int] | None = None
    split: str = "train"
    dataset: str = ""

    @property
    def where(self) -> str:
        return f"split '{self.split}'" + (f" of dataset '{self.dataset}'" if self.dataset else "")


def build_loss(name: str, ignore_label: int, class_statistics: ClassStatistics | None = None,
               multilabel: bool = False, dataset: str = "") -> LossFn:
    """Builds the registered loss ``name``, passing ``class_statistics`` only if its factory
    takes that argument (so losses that have no use for it keep their plain signature), and
    ``multilabel=True`` for a multi-label dataset, which a factory must take to serve one."""
    factory = LOSSES.get(name)
    kwargs = {"ignore_label": ignore_label}
    parameters = inspect.signature(LOSSES.original(name)).parameters
    if class_statistics is not None and "class_statistics" in parameters:
        kwargs["class_statistics"] = class_statistics
    if multilabel:
        if "multilabel" not in parameters:
            raise SegtrainError(
                f"train.loss={name!r} scores one class per pixel (a softmax), but dataset '{dataset or '?'}' is "
                f"multi-label (a sigmoid per label): use one of {', '.join(multilabel_losses())}.")
        kwargs["multilabel"] = True
    return factory(**kwargs)


def multilabel_losses() -> list[str]:
    """The registered losses that serve multi-label (and binary) datasets."""
    return [n for n in LOSSES.names() if "multilabel" in inspect.signature(LOSSES.original(n)).parameters]


def _label_targets(labels: tf.Tensor, logits: tf.Tensor, ignore_label: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Multi-label: (float32 0/1 targets [B,H,W,L] unpacked from the bits, float mask of valid pixels)."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    targets = tf.cast(unpack(tf.where(valid, labels, 0), logits.shape[-1]), tf.float32)
    return targets, tf.cast(valid, tf.float32)


def _valid_labels(labels: tf.Tensor, ignore_label: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(labels with ignored pixels set to 0, float mask of valid pixels)."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    return tf.where(valid, labels, 0), tf.cast(valid, tf.float32)


def _mean_over_valid(per_pixel: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """Per-example mean of ``per_pixel`` [B,H,W] over valid pixels -> [B]."""
    return tf.math.divide_no_nan(
        tf.reduce_sum(per_pixel * valid, axis=[1, 2]), tf.reduce_sum(valid, axis=[1, 2])
    )


def _check_ce_options(loss: str, label_smoothing: float, top_k_percent_pixels: float) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise SegtrainError(f"losses.{loss}.label_smoothing={label_smoothing} must be in [0, 1).")
    if not 0.0 < top_k_percent_pixels <= 1.0:
        raise SegtrainError(
            f"losses.{loss}.top_k_percent_pixels={top_k_percent_pixels} must be in (0, 1]: the share of "
            f"each example's valid pixels, hardest first, that the loss keeps (1 keeps all).")


def _pixel_cross_entropy(labels: tf.Tensor, logits: tf.Tensor, label_smoothing: float) -> tf.Tensor:
    """Per-pixel cross-entropy [B,H,W] against the one-hot label smoothed towards uniform:
    target = (1 - eps) one_hot + eps / C (``labels`` already valid class ids)."""
    if not label_smoothing:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    num_classes = logits.shape[-1]
    target = tf.one_hot(labels, num_classes) * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -tf.reduce_sum(target * tf.nn.log_softmax(logits), axis=-1)


def _mean_over_hardest(per_pixel: tf.Tensor, valid: tf.Tensor, top_k_percent: float) -> tf.Tensor:
    """Per-example mean of ``per_pixel`` [B,H,W] over the ceil(top_k_percent * n_valid) valid
    pixels with the largest values (online hard example mining) -> [B]."""
    if top_k_percent >= 1.0:
        return _mean_over_valid(per_pixel, valid)
    flat = tf.reshape(per_pixel, [tf.shape(per_pixel)[0], -1])
    flat_valid = tf.reshape(valid, tf.shape(flat))
    # Ignored pixels sort last (the per-pixel values are >= 0).
    ordered = tf.sort(tf.where(flat_valid > 0, flat, -1.0), axis=-1, direction="DESCENDING")
    k = tf.math.ceil(top_k_percent * tf.reduce_sum(flat_valid, axis=-1, keepdims=True))
    kept = tf.cast(tf.range(tf.shape(flat)[1], dtype=tf.float32)[None] < k, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(tf.maximum(ordered, 0.0) * kept, axis=-1),
                                 tf.reduce_sum(kept, axis=-1))


@LOSSES.register("cross_entropy")
def cross_entropy(ignore_label: int = 255, label_smoothing: float = 0.0,
                  top_k_percent_pixels: float = 1.0, multilabel: bool = False) -> LossFn:
    """Softmax cross-entropy averaged over the valid pixels of each example; multi-label: the
    binary cross-entropy of each label's sigmoid, averaged over the labels, then the pixels.

    Args:
      ignore_label: label value left out of the loss.
      label_smoothing: eps in [0, 1): the target is (1 - eps) one_hot + eps / C (multi-label:
        (1 - eps) t + eps / 2 per label).
      top_k_percent_pixels: online hard example mining (as Model Garden's setting of that
        name): each example's loss is the mean over the hardest share of its valid pixels
        (the ceil(share * n_valid) largest cross-entropies); 1 keeps every pixel.
      multilabel: set by build_loss for multi-label datasets.
    """
    _check_ce_options("cross_entropy", label_smoothing, top_k_percent_pixels)

    def loss(labels, logits):
        if multilabel:
            targets, valid = _label_targets(labels, logits, ignore_label)
            targets = targets * (1.0 - label_smoothing) + label_smoothing / 2.0
            bce = tf.nn.sigmoid_cross_entropy_with_logits(targets, tf.cast(logits, tf.float32))
            return _mean_over_hardest(tf.reduce_mean(bce, axis=-1), valid, top_k_percent_pixels)
        labels, valid = _valid_labels(labels, ignore_label)
        ce = _pixel_cross_entropy(labels, tf.cast(logits, tf.float32), label_smoothing)
        return _mean_over_hardest(ce, valid, top_k_percent_pixels)

    return loss


def batch_inverse_frequency_weights(labels: tf.Tensor, valid: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Class weights n_valid / (n_present_classes * n_c) from one batch's pixel counts [C].

    Classes absent from the batch get weight 0 (they have no pixel to weigh).
    """
    counts = tf.math.unsorted_segment_sum(tf.reshape(valid, [-1]), tf.reshape(labels, [-1]), num_classes)
    present = tf.reduce_sum(tf.cast(counts > 0, tf.float32))
    return tf.math.divide_no_nan(tf.reduce_sum(counts), present * counts)


def median_frequency_weights(pixel_counts: Sequence[int], image_pixels: Sequence[int]) -> np.ndarray:
    """Eigen & Fergus (2015): w_c = median(freq) / freq(c), freq(c) = n_c / N_c.

    n_c is the number of pixels of class c, N_c the labelled pixels of the images in which c
    appears; the median is over the classes present. Absent classes (n_c = 0) get weight 0.
    """
    counts, totals = np.asarray(pixel_counts, np.float64), np.asarray(image_pixels, np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    if present.any():
        freq = counts[present] / totals[present]
        weights[present] = np.median(freq) / freq
    return weights


def inverse_frequency_weights(pixel_counts: Sequence[int]) -> np.ndarray:
    """w_c = N / (K n_c): N labelled pixels, K classes present, n_c pixels of class c.

    A class of average size weighs 1 and the pixel-weighted mean of the weights is 1, the same
    formula as the per-batch 'batch' weights. Absent classes (n_c = 0) get weight 0.
    """
    counts = np.asarray(pixel_counts, np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def _resolve_class_weights(loss: str, class_weights, class_statistics: ClassStatistics | None):
    """None, 'batch', or a [C] NumPy array of weights from a list or the data's statistics."""
    if class_weights is None or (isinstance(class_weights, str) and class_weights == "batch"):
        return class_weights
    if isinstance(class_weights, str):
        if class_weights not in DATA_WEIGHTS:
            raise SegtrainError(
                f"losses.{loss}.class_weights={class_weights!r}: use a list of weights, 'batch', "
                f"{' or '.join(map(repr, DATA_WEIGHTS))}."
            )
        return _weights_from_data(loss, class_weights, class_statistics)
    return np.asarray(class_weights, np.float32)


def _weights_from_data(loss: str, method: str, stats: ClassStatistics | None) -> np.ndarray:
    """The class weights ``method`` gives on the training split's counts, printed once."""
    if stats is None or not stats.pixel_counts or (method == "median_frequency" and not stats.image_pixels):
        where, name = (stats.where, stats.dataset or "NAME") if stats else ("the training split", "NAME")
        raise SegtrainError(
            f"losses.{loss}.class_weights={method!r} needs the pixel counts per class that "
            f"`segtrain prepare` records, and {where} has none: run `segtrain prepare --dataset={name}` "
            f"(with --overwrite if it was prepared before the counts were recorded) and read the prepared "
            f"copy (datasets.{name}.data_dir), or give explicit weights (a list, one per class)."
        )
    names = list(stats.class_names)
    if len(stats.pixel_counts) != len(names):
        raise SegtrainError(
            f"losses.{loss}.class_weights={method!r}: {stats.where} has pixel counts for "
            f"{len(stats.pixel_counts)} classes but the dataset has {len(names)}; give explicit weights."
        )
    if method == "median_frequency":
        weights = median_frequency_weights(stats.pixel_counts, stats.image_pixels)
    else:
        weights = inverse_frequency_weights(stats.pixel_counts)
    absent = [n for n, c in zip(names, stats.pixel_counts) if c == 0]
    if absent:
        warn(f"losses.{loss}: classes {', '.join(absent)} have no pixel in {stats.where}; their "
             f"{method} weight is 0.")
    print(f"Class weights ({method}, {stats.where}): "
          + ", ".join(f"{n} {w:.4g}" for n, w in zip(names, weights)), flush=True)
    return weights.astype(np.float32)


def _class_weight_fn(loss: str, weights) -> Callable[[tf.Tensor, tf.Tensor, int], tf.Tensor] | None:
    """(labels, valid, num_classes) -> [C] weights, for resolved ``weights`` (None: no weights)."""
    if weights is None:
        return None
    if isinstance(weights, str):  # 'batch'
        return batch_inverse_frequency_weights

    def fixed(labels, valid, num_classes):
        if len(weights) != num_classes:
            raise SegtrainError(
                f"losses.{loss}.class_weights has {len(weights)} weights for {num_classes} classes."
            )
        return tf.constant(weights, tf.float32)

    return fixed


@LOSSES.register("weighted_cross_entropy")
def weighted_cross_entropy(
    ignore_label: int = 255,
    class_weights: Sequence[float] | str | None = None,
    class_statistics: ClassStatistics | None = None,
    label_smoothing: float = 0.0,
    top_k_percent_pixels: float = 1.0,
) -> LossFn:
    """Cross-entropy with a weight per class: fixed, from the training data, or per batch.

    Args:
      ignore_label: label value left out of the loss.
      class_weights: a weight per class; 'median_frequency' or 'inverse_frequency' for weights
        computed from the training split's pixel counts (recorded by `segtrain prepare`); or
        'batch' for weights recomputed from each batch's pixel counts.
      class_statistics: the training split's counts (passed by segtrain, not set in gin).
      label_smoothing, top_k_percent_pixels: as for ``cross_entropy`` (the hardest pixels are
        chosen by their weighted loss).
    """
    _check_ce_options("weighted_cross_entropy", label_smoothing, top_k_percent_pixels)
    if class_weights is None:
        raise SegtrainError(
            "losses.weighted_cross_entropy needs class_weights: a list with one weight per class, "
            "'median_frequency' or 'inverse_frequency' (from the training data), or 'batch' for "
            "per-batch inverse-frequency weights."
        )
    resolved = _resolve_class_weights("weighted_cross_entropy", class_weights, class_statistics)
    weight_fn = _class_weight_fn("weighted_cross_entropy", resolved)

    def loss(labels, logits):
        labels, valid = _valid_labels(labels, ignore_label)
        logits = tf.cast(logits, tf.float32)
        weights = weight_fn(labels, valid, logits.shape[-1])
        ce = _pixel_cross_entropy(labels, logits, label_smoothing)
        return _mean_over_hardest(ce * tf.gather(weights, labels), valid, top_k_percent_pixels)

    return loss


@LOSSES.register("dice")
def dice(ignore_label: int = 255, smooth: float = 1.0, multilabel: bool = False) -> LossFn:
    """Soft Dice loss, 1 - mean Dice over the classes present in each example's labels.

    Averaging only over present classes keeps an example with one small object from being
    dominated by the classes it does not contain. Multi-label: the soft Dice of each label's
    sigmoid, averaged over every label (a label absent from an example still scores its false
    positives: its Dice is smooth / (predicted + smooth)).
    """
    if multilabel:
        return tversky(ignore_label, alpha=0.5, beta=0.5, smooth=smooth, multilabel=True)

    def loss(labels, logits):
        labels, valid = _valid_labels(labels, ignore_label)
        logits = tf.cast(logits, tf.float32)
        probs = tf.nn.softmax(logits) * valid[..., None]
        truth = tf.one_hot(labels, logits.shape[-1]) * valid[..., None]
        intersection = tf.reduce_sum(probs * truth, axis=[1, 2])
        denominator = tf.reduce_sum(probs, axis=[1, 2]) + tf.reduce_sum(truth, axis=[1, 2])
        per_class = (2.0 * intersection + smooth) / (denominator + smooth)
        present = tf.cast(tf.reduce_sum(truth, axis=[1, 2]) > 0, tf.float32)
        mean_dice = tf.math.divide_no_nan(
            tf.reduce_sum(per_class * present, axis=-1), tf.reduce_sum(present, axis=-1)
        )
        has_pixels = tf.cast(tf.reduce_sum(valid, axis=[1, 2]) > 0, tf.float32)
        return (1.0 - mean_dice) * has_pixels

    return loss


@LOSSES.register("focal")
def focal(
    ignore_label: int = 255, gamma: float = 2.0, alpha: float | Sequence[float] | None = None,
    multilabel: bool = False,
) -> LossFn:
    """Focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p_true)^gamma.

    Multi-label: the sigmoid focal loss of each label, -a_t (1 - p_t)^gamma log(p_t) with p_t
    the probability of the true state (present or absent), averaged over labels and pixels.

    Args:
      ignore_label: label value left out of the loss.
      gamma: focusing parameter; 0 gives plain cross-entropy.
      alpha: None, one factor for every class, or a factor per class. Multi-label: the factor
        of a present label (one for all, or one per label), 1 - alpha that of an absent one,
        as RetinaNet weighs them (0.25 there).
    """

    def loss(labels, logits):
        if multilabel:
            targets, valid = _label_targets(labels, logits, ignore_label)
            logits = tf.cast(logits, tf.float32)
            bce = tf.nn.sigmoid_cross_entropy_with_logits(targets, logits)  # -log(p_t)
            p_true = tf.exp(-bce)
            per_label = tf.pow(1.0 - p_true, gamma) * bce
            if alpha is not None:
                a = tf.constant(alpha, tf.float32)
                per_label *= targets * a + (1.0 - targets) * (1.0 - a)
            return _mean_over_valid(tf.reduce_mean(per_label, axis=-1), valid)
        labels, valid = _valid_labels(labels, ignore_label)
        log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32))
        log_p_true = tf.gather(log_probs, labels, batch_dims=3)
        per_pixel = -tf.pow(1.0 - tf.exp(log_p_true), gamma) * log_p_true
        if alpha is not None:
            factors = tf.constant(alpha, tf.float32)
            per_pixel *= tf.gather(factors, labels) if factors.shape.rank else factors
        return _mean_over_valid(per_pixel, valid)

    return loss


def _lovasz_gradient(truth_sorted: tf.Tensor) -> tf.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss at pixels sorted by decreasing
    error: [..., N] 0/1 ground truth in that order -> [..., N] (Berman et al., Alg. 1)."""
    total = tf.reduce_sum(truth_sorted, axis=-1, keepdims=True)
    intersection = total - tf.cumsum(truth_sorted, axis=-1)
    union = total + tf.cumsum(1.0 - truth_sorted, axis=-1)
    jaccard = 1.0 - intersection / union  # union >= 1 from the first pixel on
    return tf.concat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], axis=-1)


@LOSSES.register("lovasz_softmax")
def lovasz_softmax(ignore_label: int = 255, classes: str = "present") -> LossFn:
    """Lovasz-softmax loss (Berman et al., CVPR 2018): a convex surrogate of 1 - IoU per class,
    on each example's softmax probabilities, averaged over classes.

    For class c, the errors |1[y = c] - p_c| of the valid pixels are sorted in decreasing order
    and weighted by the gradient of the Lovasz extension of the Jaccard loss. Ignored pixels
    sort last with no error, so they change neither the errors nor the weights of the others.

    Args:
      ignore_label: label value left out of the loss.
      classes: 'present' averages over the classes in the example's labels (the paper's
        default for per-image losses), 'all' over every class.
    """
    if classes not in ("present", "all"):
        raise SegtrainError(f"losses.lovasz_softmax.classes={classes!r}: use 'present' or 'all'.")

    def loss(labels, logits):
        labels, valid = _valid_labels(labels, ignore_label)
        logits = tf.cast(logits, tf.float32)
        num_classes = logits.shape[-1]
        batch = tf.shape(logits)[0]
        probs = tf.reshape(tf.nn.softmax(logits), [batch, -1, num_classes])
        truth = tf.reshape(tf.one_hot(labels, num_classes), [batch, -1, num_classes])
        flat_valid = tf.reshape(valid, [batch, -1, 1])
        # [B, C, N]: per class, valid pixels' errors in [0, 1]; ignored pixels -1 to sort last.
        errors = tf.transpose(tf.where(flat_valid > 0, tf.abs(truth - probs), -1.0), [0, 2, 1])
        truth = tf.transpose(truth * flat_valid, [0, 2, 1])
        order = tf.argsort(errors, axis=-1, direction="DESCENDING", stable=True)
        errors_sorted = tf.maximum(tf.gather(errors, order, batch_dims=2), 0.0)
        per_class = tf.reduce_sum(errors_sorted * tf.stop_gradient(
            _lovasz_gradient(tf.gather(truth, order, batch_dims=2))), axis=-1)  # [B, C]
        if classes == "present":
            counted = tf.cast(tf.reduce_sum(truth, axis=-1) > 0, tf.float32)
        else:
            has_pixels = tf.cast(tf.reduce_sum(flat_valid, axis=[1, 2]) > 0, tf.float32)
            counted = tf.ones_like(per_class) * has_pixels[:, None]
        return tf.math.divide_no_nan(tf.reduce_sum(per_class * counted, axis=-1), tf.reduce_sum(counted, axis=-1))

    return loss


@LOSSES.register("tversky")
def tversky(ignore_label: int = 255, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0,
            multilabel: bool = False) -> LossFn:
    """Tversky loss (Salehi et al., 2017): 1 - (TP + s) / (TP + alpha FP + beta FN + s), soft
    counts per example and class (multi-label: per label).

    A beta above alpha weighs missed pixels more than false alarms: recall on a rare
    foreground. alpha = beta = 0.5 is the Dice loss. Classes: averaged over the classes present
    in each example, as ``dice``; multi-label: over every label.

    Args:
      ignore_label: label value left out of the loss.
      alpha: weight of the false positives.
      beta: weight of the false negatives.
      smooth: s, added to numerator and denominator.
      multilabel: set by build_loss for multi-label datasets.
    """
    if alpha < 0 or beta < 0 or smooth < 0:
        raise SegtrainError(f"losses.tversky: alpha, beta and smooth must be >= 0, got {alpha}, {beta}, {smooth}.")

    def loss(labels, logits):
        logits = tf.cast(logits, tf.float32)
        if multilabel:
            truth, valid = _label_targets(labels, logits, ignore_label)
            probs = tf.sigmoid(logits)
        else:
            labels, valid = _valid_labels(labels, ignore_label)
            truth = tf.one_hot(labels, logits.shape[-1])
            probs = tf.nn.softmax(logits)
        probs, truth = probs * valid[..., None], truth * valid[..., None]
        tp = tf.reduce_sum(probs * truth, axis=[1, 2])
        fp = tf.reduce_sum(probs * (1.0 - truth), axis=[1, 2])
        fn = tf.reduce_sum((1.0 - probs) * truth, axis=[1, 2])
        index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
        counted = (tf.ones_like(index) if multilabel else
                   tf.cast(tf.reduce_sum(truth, axis=[1, 2]) > 0, tf.float32))
        mean_index = tf.math.divide_no_nan(tf.reduce_sum(index * counted, axis=-1), tf.reduce_sum(counted, axis=-1))
        has_pixels = tf.cast(tf.reduce_sum(valid, axis=[1, 2]) > 0, tf.float32)
        return (1.0 - mean_index) * has_pixels

    return loss


@LOSSES.register("lovasz_hinge")
def lovasz_hinge(ignore_label: int = 255, multilabel: bool = False) -> LossFn:
    """Lovasz hinge loss (Berman et al., CVPR 2018), for multi-label and binary datasets: per
    example and label, the hinge errors 1 - logit * (2 t - 1) of the valid pixels, sorted in
    decreasing order, their positive parts weighted by the gradient of the Lovasz extension of
    the Jaccard loss; averaged over the labels. Ignored pixels sort last with no error.
    """
    if not multilabel:
        raise SegtrainError("train.loss='lovasz_hinge' is for multi-label and binary datasets (a sigmoid per label); "
                            "for one class per pixel use 'lovasz_softmax'.")

    def loss(labels, logits):
        truth, valid = _label_targets(labels, logits, ignore_label)
        logits = tf.cast(logits, tf.float32)
        batch, num_labels = tf.shape(logits)[0], logits.shape[-1]
        flat_valid = tf.reshape(valid, [batch, -1, 1])
        errors = 1.0 - tf.reshape(logits, [batch, -1, num_labels]) * (2.0 * tf.reshape(truth, [batch, -1, num_labels]) - 1.0)
        # [B, L, N]; ignored pixels sort last (below every real error) and count nothing.
        errors = tf.transpose(tf.where(flat_valid > 0, errors, -1e30), [0, 2, 1])
        truth = tf.transpose(tf.reshape(truth, [batch, -1, num_labels]) * flat_valid, [0, 2, 1])
        order = tf.argsort(errors, axis=-1, direction="DESCENDING", stable=True)
        errors_sorted = tf.nn.relu(tf.gather(errors, order, batch_dims=2))
        per_label = tf.reduce_sum(errors_sorted * tf.stop_gradient(
            _lovasz_gradient(tf.gather(truth, order, batch_dims=2))), axis=-1)  # [B, L]
        has_pixels = tf.cast(tf.reduce_sum(flat_valid, axis=[1, 2]) > 0, tf.float32)
        return tf.reduce_mean(per_label, axis=-1) * has_pixels

    return loss


@LOSSES.register("combined")
def combined(ignore_label: int = 255, weights: Mapping[str, float] | None = None,
             class_statistics: ClassStatistics | None = None, multilabel: bool = False) -> LossFn:
    """A weighted sum of registered losses, e.g. {'cross_entropy': 1.0, 'dice': 1.0}.

    Each part is built by name, so its own gin bindings (``losses.dice.smooth``) apply; parts
    that take ``class_statistics`` get them.
    """
    if not weights:
        raise SegtrainError(
            "losses.combined needs weights, e.g. "
            "losses.combined.weights = {'cross_entropy': 1.0, 'dice': 1.0}"
        )
    if "combined" in weights:
        raise SegtrainError("losses.combined.weights cannot contain 'combined' itself.")
    parts = [(float(w), build_loss(name, ignore_label, class_statistics, multilabel)) for name, w in weights.items()]

    def loss(labels, logits):
        return tf.add_n([w * part(labels, logits) for w, part in parts])

    return loss


def unet_border_weights(label: np.ndarray, w0: float = 10.0, sigma: float = 5.0, background: int = 0,
                        ignore_label: int = 255) -> np.ndarray:
    """The separation term of the U-Net weight map (Ronneberger et al., 2015) for one label.

    w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) at background pixels, where d1 and d2 are the
    distances to the nearest and the second-nearest object, an object being a connected
    component (8-connected) of one class other than ``background`` and the ignore label. Object
    pixels and labels with fewer than two objects get 0. The term is meant for the thin gaps
    between touching objects; inside an object d1 = 0 and it would only blur the object's weight.

    Each object's distances are computed in its bounding box grown by the reach of the term
    (where it falls below 1e-4 w0), exactly there and taken as infinite beyond: the cost
    follows the objects' sizes, not their number times the image size.

    Args:
      label: int [H, W] class ids.
      w0, sigma: the term's height and width in pixels (the paper's 10 and 5).
      background: the class whose pixels separate objects.
      ignore_label: label value that is no object (its weights are never used).

    Returns:
      float32 [H, W].
    """
    objects = np.zeros(label.shape, np.int32)
    count = 0
    for value in np.unique(label):
        if value in (background, ignore_label):
            continue
        components, found = ndimage.label(label == value, structure=np.ones((3, 3)))
        objects[components > 0] = components[components > 0] + count
        count += found
    weights = np.zeros(label.shape, np.float32)
    if count < 2:
        return weights
    reach = int(np.ceil(sigma * np.sqrt(2.0 * np.log(1e4))))
    nearest = np.full(label.shape, np.inf)
    second = np.full(label.shape, np.inf)
    for index, box in enumerate(ndimage.find_objects(objects), 1):
        grown = tuple(slice(max(s.start - reach, 0), min(s.stop + reach, size))
                      for s, size in zip(box, label.shape))
        distance = ndimage.distance_transform_edt(objects[grown] != index)
        second[grown] = np.minimum(second[grown], np.maximum(nearest[grown], distance))
        nearest[grown] = np.minimum(nearest[grown], distance)
    term = w0 * np.exp(-((nearest + second) ** 2) / (2.0 * sigma**2))
    weights[label == background] = term[label == background]
    return weights


def _in_xla_context() -> bool:
    """Whether the graph being traced compiles with XLA (train.xla), which host code cannot join.

    TF has no public test for it (segtrain.compat); its absence means "no".
    """
    try:
        return compat.in_xla_context()
    except (ImportError, AttributeError):
        return False


@LOSSES.register("boundary_weighted_cross_entropy")
def boundary_weighted_cross_entropy(
    ignore_label: int = 255,
    w0: float = 10.0,
    sigma: float = 5.0,
    background: int = 0,
    class_weights: Sequence[float] | str | None = None,
    class_statistics: ClassStatistics | None = None,
) -> LossFn:
    """U-Net's loss: cross-entropy weighted by w_c(x) + w0 exp(-(d1 + d2)^2 / (2 sigma^2)).

    The second term (``unet_border_weights``) weighs the background between touching objects,
    so that the model learns to keep them apart. It depends on the label only, and is computed
    per example on the host with SciPy (connected components, one distance transform per object)
    through ``tf.numpy_function``: it runs inside tf.function and under every strategy, but not
    in an XLA-compiled step (train.xla = True is refused), and costs host time per step.

    Args:
      ignore_label: label value left out of the loss.
      w0, sigma: height and width (pixels) of the separation term; the paper's 10 and 5.
      background: the class whose pixels separate objects.
      class_weights: w_c, the class-balancing term: None (1 for every class), a weight per
        class, 'median_frequency' / 'inverse_frequency' (from the training data), or 'batch'.
      class_statistics: the training split's counts (passed by segtrain, not set in gin).
    """
    if w0 < 0 or sigma <= 0:
        raise SegtrainError(
            f"losses.boundary_weighted_cross_entropy needs w0 >= 0 and sigma > 0, got w0={w0}, sigma={sigma}."
        )
    weight_fn = _class_weight_fn("boundary_weighted_cross_entropy", _resolve_class_weights(
        "boundary_weighted_cross_entropy", class_weights, class_statistics))

    def border_maps(labels: np.ndarray) -> np.ndarray:
        maps = [unet_border_weights(x, w0, sigma, background, ignore_label) for x in labels]
        return np.asarray(maps, np.float32).reshape(labels.shape)  # a replica's batch may be empty

    def loss(labels, logits):
        if _in_xla_context():
            raise SegtrainError(
                "losses.boundary_weighted_cross_entropy computes its weight map on the host with SciPy, "
                "which an XLA-compiled step cannot run: set train.xla = False, or choose another loss."
            )
        labels = tf.cast(labels, tf.int32)
        border = tf.numpy_function(border_maps, [labels], tf.float32, stateful=False)
        border = tf.ensure_shape(border, labels.shape)
        labels, valid = _valid_labels(labels, ignore_label)
        logits = tf.cast(logits, tf.float32)
        class_weight = 1.0
        if weight_fn is not None:
            class_weight = tf.gather(weight_fn(labels, valid, logits.shape[-1]), labels)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        return _mean_over_valid(ce * (class_weight + border), valid)

    return loss
