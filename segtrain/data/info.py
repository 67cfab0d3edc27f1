"""What a dataset plugin tells the rest of segtrain about its data."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from segtrain.images import is_rgb
from segtrain.task import Task, check_multilabel, label_palette


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Facts about a segmentation dataset.

    Attributes:
      num_classes: number of classes; labels are 0..num_classes-1 or ignore_label. With
        ``multilabel``, the number of labels L (1..7), and a label value holds the labels
        present as bits (segtrain.task); binary segmentation is L = 1.
      ignore_label: label value excluded from losses and metrics (255 by convention).
      class_names: one name per class.
      palette: one RGB colour per class, for visualisation.
      num_examples: examples per split, e.g. {'train': 1000, 'validation': 100}.
      name: the dataset's registry name, used in messages.
      decode: set by datasets whose elements are still encoded (files, prepared datasets):
        maps an element to {'image': uint8 [H,W,3], 'label': uint8 [H,W]}. The pipeline then
        shuffles and shards the small encoded elements and decodes inside its parallel map.
      decode_region: optional, with ``decode``: (element, choose) -> {'image': uint8 [h,w,3],
        'label': uint8 [h,w]}, a region of the decoded element only. ``choose`` takes the
        image's (height, width) [2] and returns the region's offset and extent ([2] each); call
        it once, outside any tf.cond. Training crops use it to decode only what they keep (a
        JPEG's region alone).
      labels_checked: every label value is known to be a class or the ignore label (a dataset
        `segtrain prepare` checked): the pipeline skips its per-example check.
      class_pixel_counts: per split, the pixels of each class (ignore-label pixels not
        counted), e.g. {'train': [90210, 4521, ...]}; recorded by `segtrain prepare`, empty
        for datasets read any other way.
      class_image_pixels: per split, for each class, the labelled (not ignored) pixels of the
        images in which the class appears: the normaliser of median-frequency weights.
      multilabel: each pixel carries any set of labels (sigmoid outputs), packed as bits.
      channels: the images' bands (3: RGB).
      image_dtype: 'uint8' or 'uint16', the images' samples as the dataset yields them.
      channel_mean, channel_std: per split, per band, on the stored scale, e.g. {'train': [...]}
        (recorded by `segtrain prepare` for images other than 8-bit RGB; empty otherwise): the
        pipeline normalises such images with the training split's.
      damaged_records: per split, the records a dataset read with skip_damaged_records left
        out (damaged shards, counted when it was read).
    """

    num_classes: int
    ignore_label: int = 255
    class_names: Sequence[str] = ()
    palette: Sequence[Sequence[int]] = ()
    num_examples: Mapping[str, int] = dataclasses.field(default_factory=dict)
    name: str = ""
    decode: Callable[[dict], dict] | None = dataclasses.field(default=None, compare=False, repr=False)
    decode_region: Callable[[dict, Callable], dict] | None = dataclasses.field(
        default=None, compare=False, repr=False)
    labels_checked: bool = False
    class_pixel_counts: Mapping[str, Sequence[int]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False)
    class_image_pixels: Mapping[str, Sequence[int]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False)
    damaged_records: Mapping[str, int] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    multilabel: bool = False
    channels: int = 3
    image_dtype: str = "uint8"
    channel_mean: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    channel_std: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0 <= self.ignore_label <= 255 or self.ignore_label < self.num_classes:
            raise ValueError(
                f"ignore_label {self.ignore_label} must be in [num_classes, 255] "
                f"(num_classes={self.num_classes})"
            )
        if self.image_dtype not in ("uint8", "uint16") or self.channels < 1:
            raise ValueError(f"DatasetInfo of {self.name or 'a dataset'}: images of {self.channels} channels of "
                             f"{self.image_dtype}; segtrain reads uint8 or uint16 images of one channel or more")
        if self.multilabel:
            check_multilabel(self.num_classes, self.ignore_label, f"dataset {self.name or '(unnamed)'}")
        if not self.class_names:
            object.__setattr__(
                self, "class_names", tuple(f"class_{i}" for i in range(self.num_classes))
            )
        if not self.palette:
            object.__setattr__(self, "palette", default_palette(self.num_classes))
        if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
            raise ValueError(
                f"DatasetInfo of {self.name or 'a dataset'} has {len(self.class_names)} class "
                f"names and {len(self.palette)} colours for {self.num_classes} classes"
            )

    @property
    def rgb(self) -> bool:
        """8-bit RGB images, as photographs are (else: bands, see ``channels``)."""
        return is_rgb(self.channels, self.image_dtype)

    @property
    def max_value(self) -> int:
        """The largest sample value of the images' type."""
        return 255 if self.image_dtype == "uint8" else 65535

    @property
    def task(self) -> Task:
        """What the labels mean (classes or multi-label bits), at the default threshold."""
        return Task.of(self)

    def palette_array(self) -> np.ndarray:
        """[256, 3] uint8 colour table of label values: class colours (multi-label: each value the
        mean colour of its labels), black for unused values, the ignore label white."""
        if self.multilabel:
            return label_palette(self.palette, self.ignore_label)
        table = np.zeros((256, 3), np.uint8)
        table[: self.num_classes] = np.asarray(self.palette, np.uint8)
        table[self.ignore_label] = (255, 255, 255)
        return table


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """The Pascal VOC colour map (bit-interleaved), a distinct colour per class index."""
    colours = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)
