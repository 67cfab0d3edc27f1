"""Where a model fails: the worst images, boundaries, small objects, and over-confidence.

Mean IoU says how much is wrong, not where. `segtrain evaluate` adds, over the same split:

- **Per-image IoU** and the ``worst`` images by it: for each image, the mean over the classes
  present in its ground truth or its prediction of that image's IoU. The worst become panels:
  input | ground truth | prediction | errors (wrong pixels red on the grey input, ignored
  pixels white).
- **Boundary IoU** (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
  Evaluation", CVPR 2021): the IoU of each class's mask restricted to the pixels within ``d``
  pixels of the mask's contour, ``d = max(1, round(boundary_ratio x image diagonal))``. As the
  reference implementation does, a mask's boundary region is the mask minus its erosion by a
  3 x 3 square ``d`` times (outside the image counts as background). Intersections and unions
  are summed over the split, then divided per class; the mean is over classes whose union is
  not empty. It punishes a blurred contour that mean IoU hardly sees.
- **IoU by object size**: each connected region (8-connectivity) of a class in the ground
  truth is an object, small / medium / large by its pixel count (below ``object_sizes[0]``,
  below ``object_sizes[1]``, the rest; COCO's 32^2 and 96^2 by default). An object's IoU is
  that of the region and the predicted regions of its class that touch it (so a prediction
  that spills over counts against it, a prediction elsewhere does not). Per size: the mean
  object IoU and the number of objects, also per class. Classes named 'background' have no
  objects.
- **Calibration**: the expected calibration error over pixels, ECE = sum over ``bins`` equal
  confidence bins of (pixels in bin / pixels) x |accuracy in bin - mean confidence in bin|,
  where a pixel's confidence is its top class probability and it is correct when the top class
  is the truth (multi-label: one decision per pixel and label, confidence max(p, 1 - p)). The
  per-bin accuracy, confidence and count make the reliability diagram.
- **Temperature scaling** (Guo et al. 2017): a single T > 0 that minimises the negative log
  likelihood of softmax(logits / T) (sigmoids for multi-label) on the validation split, fitted
  on a random sample of its pixels. ``inference.temperature`` applies it; argmax predictions do
  not change, probabilities do.

Ignored pixels count nowhere. Everything here is NumPy on the host, one image at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from segtrain.task import Task, unpack_np

SIZES = ("small", "medium", "large")
EIGHT = np.ones((3, 3), bool)


def masks(labels: np.ndarray, task: Task) -> np.ndarray:
    """bool [C, H, W]: each class's (or label's) pixels of a label map of class ids (or bits)."""
    labels = np.asarray(labels)
    if task.multilabel:
        return np.moveaxis(unpack_np(np.where(labels == task.ignore_label, 0, labels), task.num_classes), -1, 0) > 0
    return labels[np.newaxis] == np.arange(task.num_classes)[:, np.newaxis, np.newaxis]


def boundary(mask: np.ndarray, distance: int) -> np.ndarray:
    """The pixels of ``mask`` within ``distance`` of its contour: the mask minus its erosion by a
    3 x 3 square, ``distance`` times, the outside of the image counted as background."""
    if not mask.any():
        return mask
    eroded = ndimage.binary_erosion(mask, structure=EIGHT, iterations=distance, border_value=0)
    return mask & ~eroded


def boundary_distance(height: int, width: int, ratio: float) -> int:
    return max(1, int(round(ratio * math.hypot(height, width))))


def image_iou(truth: np.ndarray, predicted: np.ndarray, valid: np.ndarray) -> float:
    """Mean over the classes in either the truth or the prediction of one image's IoU (1.0 when an
    image has no valid pixel)."""
    t, p = truth & valid, predicted & valid
    inter = (t & p).sum(axis=(1, 2))
    union = (t | p).sum(axis=(1, 2))
    present = union > 0
    return float(np.mean(inter[present] / union[present])) if present.any() else 1.0


def object_ious(truth: np.ndarray, predicted: np.ndarray) -> list[tuple[int, float]]:
    """(size, IoU) of every object of one class: each connected region of ``truth``, against the
    predicted regions that touch it."""
    regions, count = ndimage.label(truth, structure=EIGHT)
    if not count:
        return []
    pieces, _ = ndimage.label(predicted, structure=EIGHT)
    piece_sizes = np.bincount(pieces.ravel())
    out = []
    for i, where in enumerate(ndimage.find_objects(regions), 1):
        region = regions[where] == i
        under = pieces[where][region]  # the predicted piece under each of the object's pixels (0: none)
        touching = np.unique(under[under > 0])
        inter = int((under > 0).sum())
        union = int(region.sum()) + int(piece_sizes[touching].sum()) - inter
        out.append((int(region.sum()), inter / union))
    return out


def size_of(pixels: int, object_sizes: Sequence[int]) -> str:
    return SIZES[0] if pixels < object_sizes[0] else SIZES[1] if pixels < object_sizes[1] else SIZES[2]


def calibration_bins(probabilities: np.ndarray, truth: np.ndarray, valid: np.ndarray, task: Task,
                     bins: int) -> np.ndarray:
    """float64 [3, bins]: pixel count, summed confidence and summed correctness per confidence bin."""
    if task.multilabel:
        bits = unpack_np(np.where(valid, truth, 0), task.num_classes)
        p = probabilities[valid]
        confidence = np.maximum(p, 1.0 - p).ravel()
        correct = ((p > task.threshold) == (bits[valid] > 0)).ravel()
    else:
        p = probabilities[valid]
        confidence = p.max(axis=-1)
        correct = np.argmax(p, axis=-1) == truth[valid]
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    out = np.zeros([3, bins])
    out[0] = np.bincount(index, minlength=bins)
    out[1] = np.bincount(index, weights=confidence, minlength=bins)
    out[2] = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    return out


def ece(table: np.ndarray) -> float:
    """The expected calibration error of calibration_bins' sums."""
    count, confidence, correct = table
    total = count.sum()
    if not total:
        return float("nan")
    filled = count > 0
    return float(np.sum(np.abs(correct[filled] - confidence[filled])) / total)


@dataclasses.dataclass
class Failures:
    """Accumulates the failure views image by image (``add``), then reports them (``results``).

    Args:
      task: what the labels and probabilities mean.
      class_names: the classes (or labels).
      worst: how many of the worst images to keep.
      boundary_ratio: boundary width as a fraction of the image diagonal.
      object_sizes: the pixel counts that separate small, medium and large objects.
      bins: confidence bins of the calibration error.
      temperature: a fitted temperature: the calibration is also measured with it.
    """

    task: Task
    class_names: Sequence[str]
    worst: int = 8
    boundary_ratio: float = 0.02
    object_sizes: Sequence[int] = (32 ** 2, 96 ** 2)
    bins: int = 15
    temperature: float | None = None

    def __post_init__(self):
        c = self.task.num_classes
        self.images: list[tuple[float, int]] = []
        self.boundary_inter = np.zeros(c, np.int64)
        self.boundary_union = np.zeros(c, np.int64)
        self.objects = {size: [[] for _ in range(c)] for size in SIZES}
        self.calibration = np.zeros([3, self.bins])
        self.calibrated = np.zeros([3, self.bins])
        self.object_classes = [i for i, n in enumerate(self.class_names) if str(n).lower() != "background"]

    def add(self, index: int, truth: np.ndarray, logits: np.ndarray) -> None:
        """One image: its label map [H, W] and the model's logits [H, W, C] at the label's size."""
        truth = np.asarray(truth).astype(np.int64)
        valid = truth != self.task.ignore_label
        logits = np.asarray(logits, np.float32)
        probabilities = probabilities_np(logits, self.task)
        predicted = predict_np(probabilities, self.task)
        t, p = masks(truth, self.task) & valid, masks(predicted, self.task) & valid
        self.images.append((image_iou(t, p, valid), index))
        d = boundary_distance(*truth.shape, self.boundary_ratio)
        for c in range(self.task.num_classes):
            if not (t[c].any() or p[c].any()):
                continue
            # Ignored pixels are neither in the truth nor in the prediction, so their edge counts as
            # a contour of both alike.
            bt, bp = boundary(t[c], d), boundary(p[c], d)
            self.boundary_inter[c] += int((bt & bp).sum())
            self.boundary_union[c] += int((bt | bp).sum())
        for c in self.object_classes:
            for pixels, iou in object_ious(t[c], p[c]):
                self.objects[size_of(pixels, self.object_sizes)][c].append(iou)
        self.calibration += calibration_bins(probabilities, truth, valid, self.task, self.bins)
        if self.temperature is not None:
            self.calibrated += calibration_bins(probabilities_np(logits / self.temperature, self.task), truth, valid,
                                                self.task, self.bins)

    def worst_images(self) -> list[tuple[float, int]]:
        """(IoU, index) of the ``worst`` images, worst first (ties: the earlier image)."""
        return sorted(self.images, key=lambda x: (x[0], x[1]))[: self.worst]

    def results(self) -> dict:
        """The views as plain values (JSON-ready but for NaN)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class_boundary = np.where(self.boundary_union > 0, self.boundary_inter / np.maximum(
                self.boundary_union, 1), np.nan)
        by_size = {}
        for size in SIZES:
            per_class = [float(np.mean(v)) if v else float("nan") for v in self.objects[size]]
            every = [iou for v in self.objects[size] for iou in v]
            by_size[size] = {"mean_iou": float(np.mean(every)) if every else float("nan"), "objects": len(every),
                             "per_class_iou": per_class, "per_class_objects": [len(v) for v in self.objects[size]]}
        count, confidence, correct = self.calibration
        out = {
            "boundary_iou": float(np.nanmean(per_class_boundary)) if np.any(self.boundary_union) else float("nan"),
            "per_class_boundary_iou": [float(v) for v in per_class_boundary],
            "iou_by_size": by_size,
            "object_sizes": [int(s) for s in self.object_sizes],
            "ece": ece(self.calibration),
            "reliability": {"count": count.astype(np.int64).tolist(),
                            "confidence": _ratio(confidence, count), "accuracy": _ratio(correct, count)},
            "worst_images": [{"index": i, "iou": iou} for iou, i in self.worst_images()],
            "images": len(self.images),
        }
        if self.temperature is not None:
            out["temperature"] = float(self.temperature)
            out["ece_calibrated"] = ece(self.calibrated)
            count, confidence, correct = self.calibrated
            out["reliability_calibrated"] = {"count": count.astype(np.int64).tolist(),
                                             "confidence": _ratio(confidence, count),
                                             "accuracy": _ratio(correct, count)}
        return out


def _ratio(a: np.ndarray, b: np.ndarray) -> list:
    return [float(x / n) if n else float("nan") for x, n in zip(a, b)]


def probabilities_np(logits: np.ndarray, task: Task) -> np.ndarray:
    """NumPy twin of Task.probabilities (float64 for the sums)."""
    x = np.asarray(logits, np.float64)
    if task.multilabel:
        return 1.0 / (1.0 + np.exp(-x))
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def predict_np(probabilities: np.ndarray, task: Task) -> np.ndarray:
    """NumPy twin of Task.from_probabilities."""
    if not task.multilabel:
        return np.argmax(probabilities, axis=-1)
    return np.sum((probabilities > task.threshold) << np.arange(task.num_classes), axis=-1)


def error_panel(image: np.ndarray, truth: np.ndarray, predicted: np.ndarray, palette: np.ndarray,
                ignore_label: int) -> np.ndarray:
    """Input | ground truth | prediction | errors, side by side (uint8 [H, 4W + 12, 3]): the errors
    are the wrong pixels in red over the grey input, ignored pixels white."""
    from segtrain.images import colorize

    grey = np.repeat(np.asarray(image, np.float32).mean(axis=-1, keepdims=True), 3, axis=-1)
    errors = (0.5 * grey).astype(np.uint8)
    wrong = (truth != predicted) & (truth != ignore_label)
    errors[wrong] = (255, 0, 0)
    errors[truth == ignore_label] = (255, 255, 255)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([np.asarray(image, np.uint8), gap, colorize(truth, palette), gap,
                           colorize(predicted, palette), gap, errors], axis=1)


# ---- temperature scaling --------------------------------------------------------------------
class PixelSample:
    """A random sample of (logits, label) pixels over a split, at most ``capacity`` of them
    (reservoir sampling: every valid pixel equally likely, whatever the images' sizes)."""

    def __init__(self, task: Task, capacity: int = 1_000_000, seed: int = 0):
        self.task, self.capacity = task, capacity
        self.rng = np.random.default_rng(seed)
        self.logits: np.ndarray | None = None
        self.labels = np.zeros([0], np.int64)
        self.keys = np.zeros([0])
        self.seen = 0

    def add(self, truth: np.ndarray, logits: np.ndarray) -> None:
        truth = np.asarray(truth).reshape(-1).astype(np.int64)
        logits = np.asarray(logits, np.float32).reshape(truth.size, -1)
        valid = truth != self.task.ignore_label
        truth, logits = truth[valid], logits[valid]
        if self.logits is None:
            self.logits = np.zeros([0, logits.shape[1]], np.float32)
        # Each new pixel gets a random key; the sample keeps the ``capacity`` smallest keys.
        keys = self.rng.random(truth.size)
        self.seen += truth.size
        merged_keys = np.concatenate([self.keys, keys])
        merged_logits = np.concatenate([self.logits, logits])
        merged_labels = np.concatenate([self.labels, truth])
        if merged_keys.size > self.capacity:
            keep = np.argpartition(merged_keys, self.capacity)[: self.capacity]
            merged_keys, merged_logits, merged_labels = merged_keys[keep], merged_logits[keep], merged_labels[keep]
        self.keys, self.logits, self.labels = merged_keys, merged_logits, merged_labels


def nll(logits: np.ndarray, labels: np.ndarray, task: Task, temperature: float) -> float:
    """Mean negative log likelihood of the labels under the probabilities of logits / T."""
    x = np.asarray(logits, np.float64) / temperature
    if task.multilabel:
        y = unpack_np(labels, task.num_classes).astype(np.float64)
        # log(1 + exp(-|x|)) + max(x, 0) - x y: the stable binary cross-entropy of logits
        return float(np.mean(np.logaddexp(0.0, -np.abs(x)) + np.maximum(x, 0.0) - x * y))
    x = x - x.max(axis=-1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(-np.mean(log_p[np.arange(labels.size), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, task: Task) -> tuple[float, float, float]:
    """The temperature in [0.05, 20] that minimises the NLL of ``labels``; returns (T, NLL at 1,
    NLL at T). One parameter, a smooth convex-in-practice curve: a bounded scalar search."""
    from scipy.optimize import minimize_scalar

    if labels.size == 0:
        raise ValueError("no pixel to fit a temperature on")
    found = minimize_scalar(lambda log_t: nll(logits, labels, task, math.exp(log_t)), bounds=(math.log(0.05),
                            math.log(20.0)), method="bounded", options={"xatol": 1e-4})
    t = float(math.exp(found.x))
    return t, nll(logits, labels, task, 1.0), nll(logits, labels, task, t)
