"""Loss plugins: ``fn(ignore_label=255, **config) -> loss(labels, logits) -> [B]``.

``labels`` are int [B,H,W], ``logits`` float [B,H,W,C]. Pixels whose label is the ignore
label are left out of both the sum and the normaliser; an example with no valid pixel has
loss 0. The trainer turns the per-example losses into the global-batch mean.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import tensorflow as tf

from registry import LOSSES
from segtrain.errors import SegtrainError

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


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


@LOSSES.register("cross_entropy")
def cross_entropy(ignore_label: int = 255) -> LossFn:
    """Softmax cross-entropy averaged over the valid pixels of each example."""

    def loss(labels, logits):
        labels, valid = _valid_labels(labels, ignore_label)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.cast(logits, tf.float32))
        return _mean_over_valid(ce, valid)

    return loss


def batch_inverse_frequency_weights(labels: tf.Tensor, valid: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Class weights n_valid / (n_present_classes * n_c) from one batch's pixel counts [C].

    Classes absent from the batch get weight 0 (they have no pixel to weigh).
    """
    counts = tf.math.unsorted_segment_sum(tf.reshape(valid, [-1]), tf.reshape(labels, [-1]), num_classes)
    present = tf.reduce_sum(tf.cast(counts > 0, tf.float32))
    return tf.math.divide_no_nan(tf.reduce_sum(counts), present * counts)


@LOSSES.register("weighted_cross_entropy")
def weighted_cross_entropy(
    ignore_label: int = 255, class_weights: Sequence[float] | str | None = None
) -> LossFn:
    """Cross-entropy with a weight per class: fixed, or per batch by inverse frequency.

    Args:
      ignore_label: label value left out of the loss.
      class_weights: a weight per class (e.g. median-frequency weights of the training set),
        or 'batch' for weights recomputed from each batch's pixel counts (chapter 8).
    """
    if class_weights is None:
        raise SegtrainError(
            "losses.weighted_cross_entropy needs class_weights: a list with one weight per "
            "class, or 'batch' for per-batch inverse-frequency weights."
        )
    if isinstance(class_weights, str) and class_weights != "batch":
        raise SegtrainError(
            f"losses.weighted_cross_entropy.class_weights={class_weights!r}: use a list of "
            "weights or 'batch'."
        )

    def loss(labels, logits):
        labels, valid = _valid_labels(labels, ignore_label)
        logits = tf.cast(logits, tf.float32)
        num_classes = logits.shape[-1]
        if isinstance(class_weights, str):
            weights = batch_inverse_frequency_weights(labels, valid, num_classes)
        else:
            if len(class_weights) != num_classes:
                raise SegtrainError(
                    f"losses.weighted_cross_entropy.class_weights has {len(class_weights)} "
                    f"weights for {num_classes} classes."
                )
            weights = tf.constant(class_weights, tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        return _mean_over_valid(ce * tf.gather(weights, labels), valid)

    return loss


@LOSSES.register("dice")
def dice(ignore_label: int = 255, smooth: float = 1.0) -> LossFn:
    """Soft Dice loss, 1 - mean Dice over the classes present in each example's labels.

    Averaging only over present classes keeps an example with one small object from being
    dominated by the classes it does not contain.
    """

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
    ignore_label: int = 255, gamma: float = 2.0, alpha: float | Sequence[float] | None = None
) -> LossFn:
    """Focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p_true)^gamma.

    Args:
      ignore_label: label value left out of the loss.
      gamma: focusing parameter; 0 gives plain cross-entropy.
      alpha: None, one factor for every class, or a factor per class.
    """

    def loss(labels, logits):
        labels, valid = _valid_labels(labels, ignore_label)
        log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32))
        log_p_true = tf.gather(log_probs, labels, batch_dims=3)
        per_pixel = -tf.pow(1.0 - tf.exp(log_p_true), gamma) * log_p_true
        if alpha is not None:
            factors = tf.constant(alpha, tf.float32)
            per_pixel *= tf.gather(factors, labels) if factors.shape.rank else factors
        return _mean_over_valid(per_pixel, valid)

    return loss


@LOSSES.register("combined")
def combined(ignore_label: int = 255, weights: Mapping[str, float] | None = None) -> LossFn:
    """A weighted sum of registered losses, e.g. {'cross_entropy': 1.0, 'dice': 1.0}.

    Each part is built by name, so its own gin bindings (``losses.dice.smooth``) apply.
    """
    if not weights:
        raise SegtrainError(
            "losses.combined needs weights, e.g. "
            "losses.combined.weights = {'cross_entropy': 1.0, 'dice': 1.0}"
        )
    if "combined" in weights:
        raise SegtrainError("losses.combined.weights cannot contain 'combined' itself.")
    parts = [(float(w), LOSSES.get(name)(ignore_label=ignore_label)) for name, w in weights.items()]

    def loss(labels, logits):
        return tf.add_n([w * part(labels, logits) for w, part in parts])

    return loss
