"""Inference: a model's logits for whole images, by sliding windows, and with test-time augmentation.

Every command that runs a trained model (evaluate, predict, export, explain) gets its logits
here, so a model sees the same input in each. Images come in normalised, as float32
[B,H,W,3] (or the model's bands) of any height and width; logits go out as float32 [B,H,W,C] at the same size.

- ``whole``: the image is padded (bottom and right) to a multiple of the model's size divisor,
  the model runs once, and the logits are cropped back.
- ``slide``: windows of ``crop_size`` every ``stride``, placed as MMSegmentation's
  ``slide_inference`` places them: the last window of a row or column is flush with the image's
  border, so every pixel is covered; the logits of overlapping windows are summed and divided by
  how many windows cover each pixel. An image smaller than a window is padded to it.
- Test-time augmentation (``scales``, ``flip``): the image is resized to each scale (and
  flipped left-right), inferred as above, its logits resized back and un-flipped, and the
  probabilities of every view averaged (softmax; a multi-label model's sigmoids). ``logits`` then
  returns the logits of that average (its log; the log-odds of each label), so the prediction,
  the probabilities and the loss of the averaged prediction all follow from it.
- ``threshold`` (multi-label models): a label is predicted where its probability exceeds it.

Only TensorFlow ops: the methods trace inside a ``tf.function`` and run per replica.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import tensorflow as tf

from segtrain.errors import SegtrainError
from segtrain.task import Task

MODES = ("whole", "slide")


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How a model is run over an image.

    Attributes:
      mode: 'whole' or 'slide'.
      crop_size: (height, width) of the sliding windows (mode 'slide').
      stride: (height, width) step between windows (default: two thirds of crop_size, rounded up).
      scales: test-time scales; the softmax of every scale (and flip) is averaged.
      flip: also infer on the left-right flipped image.
      threshold: multi-label models: a label is predicted where its probability exceeds this.
      temperature: probabilities are those of logits / temperature (segtrain.failures).
    """

    mode: str = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    threshold: float = 0.5
    temperature: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise SegtrainError(f"--mode={self.mode!r}: use 'whole' or 'slide'.")
        object.__setattr__(self, "crop_size", _pair("crop_size", self.crop_size))
        object.__setattr__(self, "stride", _pair("stride", self.stride))
        if self.mode == "slide" and self.crop_size is None:
            raise SegtrainError("--mode=slide needs --crop_size=H,W (the window size), e.g. --crop_size=512,1024.")
        if self.mode == "slide" and self.stride is None:
            object.__setattr__(self, "stride", tuple(-(-2 * c // 3) for c in self.crop_size))
        try:
            scales = tuple(float(s) for s in ([self.scales] if isinstance(self.scales, (int, float, str))
                                               else self.scales))
        except (TypeError, ValueError):
            raise SegtrainError(f"--scales={self.scales!r}: give numbers, e.g. --scales=0.75,1.0,1.25.") from None
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise SegtrainError(f"--scales={self.scales!r}: every scale must be a number > 0.")
        object.__setattr__(self, "scales", scales)
        if not isinstance(self.flip, bool):
            raise SegtrainError(f"--flip must be True or False, got {self.flip!r}.")
        Task(1, threshold=self.threshold, temperature=self.temperature)  # checks them

    @property
    def augmented(self) -> bool:
        """True when test-time augmentation averages more than the one plain view."""
        return self.flip or self.scales != (1.0,)

    def describe(self) -> str:
        """One line for logs: 'whole', 'slide 512x1024 every 341x683, scales 0.75,1,1.25 + flip'."""
        text = self.mode
        if self.mode == "slide":
            text += f" {self.crop_size[0]}x{self.crop_size[1]} every {self.stride[0]}x{self.stride[1]}"
        if self.scales != (1.0,):
            text += ", scales " + ",".join(f"{s:g}" for s in self.scales)
        if self.flip:
            text += " + flip"
        if self.threshold != 0.5:
            text += f", threshold {self.threshold:g}"
        if self.temperature != 1.0:
            text += f", temperature {self.temperature:.3g}"
        return text


def _pair(name: str, value) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        values = [int(v) for v in ([value, value] if isinstance(value, (int, str)) and not
                                   (isinstance(value, str) and "," in value) else
                                   (value.split(",") if isinstance(value, str) else value))]
    except (TypeError, ValueError):
        values = []
    if len(values) != 2 or min(values) < 1:
        raise SegtrainError(f"--{name}={value!r}: give two integers >= 1 as H,W, e.g. --{name}=512,1024.")
    return values[0], values[1]


def num_windows(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of sliding windows over a height x width image, as slide_inference counts them."""
    rows = max(height - crop_size[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop_size[1] + stride[1] - 1, 0) // stride[1] + 1
    return rows, cols


def windows(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Every window (top, left, bottom, right) over the image; the last ones flush with its border."""
    rows, cols = num_windows(height, width, crop_size, stride)
    out = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride[0] + crop_size[0], height), min(c * stride[1] + crop_size[1], width)
            out.append((max(bottom - crop_size[0], 0), max(right - crop_size[1], 0), bottom, right))
    return out


class Inference:
    """Runs a model over normalised images the way ``options`` says.

    Args:
      model: a keras model from images [B,h,w,3] to logits [B,h',w',C] (h' = h unless the model
        downsamples; its logits are then resized to the input size).
      num_classes: C.
      size_divisor: the model's input height and width must be multiples of this.
      options: whole or sliding windows, test-time scales and flip.
      fill: the normalised value padding is filled with.
      task: what the logits mean (default: C classes); its threshold is ``options.threshold``.
    """

    def __init__(self, model, num_classes: int, size_divisor: int = 1,
                 options: InferenceOptions | None = None, fill: float = 0.0, task: Task | None = None):
        self.model = model
        self.num_classes = num_classes
        self.options = options or InferenceOptions()
        task = task or Task(num_classes)
        self.task = dataclasses.replace(task, threshold=self.options.threshold, temperature=self.options.temperature)
        self.size_divisor = max(int(size_divisor), 1)
        self.fill = fill
        if self.options.mode == "slide" and self.size_divisor > 1:
            ch, cw = self.options.crop_size
            if ch % self.size_divisor or cw % self.size_divisor:
                raise SegtrainError(
                    f"--crop_size={ch},{cw} does not suit the model: its windows must be multiples of "
                    f"{self.size_divisor}."
                )

    def logits(self, images: tf.Tensor) -> tf.Tensor:
        """float32 [B,H,W,C] logits of normalised images [B,H,W,3]; with test-time augmentation the
        logits of the averaged probabilities."""
        images = tf.convert_to_tensor(images, tf.float32)
        if not self.options.augmented:
            return self._view(images)
        return self.task.logits_of(self._augmented(images))

    def probabilities(self, images: tf.Tensor) -> tf.Tensor:
        """float32 [B,H,W,C] probabilities (softmax of the classes, or each label's sigmoid),
        averaged over the test-time views."""
        images = tf.convert_to_tensor(images, tf.float32)
        if not self.options.augmented:
            return self.task.probabilities(self._view(images))
        return self._augmented(images)

    # One view: whole or sliding windows.
    def _view(self, images):
        if self.options.mode == "slide":
            return self._slide(images)
        return self._whole(images)

    def _augmented(self, images):
        size = tf.shape(images)[1:3]
        total = None
        for scale in self.options.scales:
            if scale == 1.0:
                scaled = images
            else:
                scaled_size = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32), 1)
                scaled = tf.image.resize(images, scaled_size, method="bilinear")
            for flipped in ((False, True) if self.options.flip else (False,)):
                view = tf.reverse(scaled, axis=[2]) if flipped else scaled
                logits = self._view(view)
                if flipped:
                    logits = tf.reverse(logits, axis=[2])
                if scale != 1.0:
                    logits = tf.image.resize(logits, size, method="bilinear")
                probs = self.task.probabilities(logits)
                total = probs if total is None else total + probs
        return total / float(len(self.options.scales) * (2 if self.options.flip else 1))

    def _whole(self, images):
        """The model on images padded to the size divisor; logits cropped back to the input size."""
        size = tf.shape(images)[1:3]
        d = self.size_divisor
        padded = images
        if d > 1:
            target = (size + d - 1) // d * d
            padded = self._pad(images, target)
        logits = tf.cast(self.model(padded, training=False), tf.float32)
        padded_size = tf.shape(padded)[1:3]
        logits = tf.cond(
            tf.reduce_all(tf.equal(tf.shape(logits)[1:3], padded_size)),
            lambda: logits,
            lambda: tf.image.resize(logits, padded_size, method="bilinear"),
        )
        return logits[:, : size[0], : size[1], :]

    def _pad(self, images, target):
        size = tf.shape(images)[1:3]
        extra = tf.maximum(target - size, 0)
        return tf.pad(images, [[0, 0], [0, extra[0]], [0, extra[1]], [0, 0]], constant_values=self.fill)

    def _slide(self, images):
        """Sliding-window logits: sums of overlapping windows over how many windows cover a pixel."""
        (ch, cw), (sh, sw) = self.options.crop_size, self.options.stride
        shape = tf.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        rows = tf.maximum(height - ch + sh - 1, 0) // sh + 1
        cols = tf.maximum(width - cw + sw - 1, 0) // sw + 1

        # The sums are kept pixel-major, [H, W, B, C], so each window's logits are added into
        # its own rows and columns (a scatter-add of the window's size), not padded to the image.
        def body(i, total, count):
            r, c = i // cols, i % cols
            bottom, right = tf.minimum(r * sh + ch, height), tf.minimum(c * sw + cw, width)
            top, left = tf.maximum(bottom - ch, 0), tf.maximum(right - cw, 0)
            window = images[:, top:bottom, left:right, :]
            h, w = bottom - top, right - left
            window = tf.ensure_shape(self._pad(window, tf.constant([ch, cw])), [None, ch, cw, images.shape[-1]])
            logits = self._whole(window)[:, :h, :w, :]
            where = tf.stack(tf.meshgrid(tf.range(top, bottom), tf.range(left, right), indexing="ij"), axis=-1)
            total = tf.tensor_scatter_nd_add(total, where, tf.transpose(logits, [1, 2, 0, 3]))
            count = tf.tensor_scatter_nd_add(count, where, tf.ones([h, w]))
            return i + 1, total, count

        total = tf.zeros([height, width, batch, self.num_classes], tf.float32)
        count = tf.zeros([height, width], tf.float32)
        _, total, count = tf.while_loop(lambda i, *_: i < rows * cols, body, (tf.constant(0), total, count))
        # Windows flush with the border cover every pixel: count is never 0.
        return tf.transpose(total / count[:, :, tf.newaxis, tf.newaxis], [2, 0, 1, 3])
