"""Your own data (``folder``): a folder of images and a folder of masks, matched by file stem.

Layout (``source_dir``)::

    images/<stem>.{jpg,jpeg,png,bmp,tif,tiff}
    masks/<stem>.png|tif          class-index PNG (grey or palettized: value = class id), or an
                                  RGB colour mask whose colours are listed in ``palette``
    splits/<split>.txt            optional: one stem per line, for every split

Images are RGB photographs by default (grey and RGBA converted). With ``channels`` (and
``bit_depth`` 16), they are read as stored, any number of bands of 8 or 16 bits (multispectral
TIFF, 16-bit PNG, ...; ``segtrain.images.read_bands``); every image must have those bands.

Multi-label (and binary) masks, where a pixel may carry several labels (segtrain.task), come
in one of three layouts, chosen by ``labels``:

- ``'bits'``: masks/<stem>.png holds the labels present as bits (label i: bit i; 255 ignored).
  A binary mask of 0 and 1 is this with one label.
- ``'channels'``: masks/<stem>.png|tif has one channel per label (grey for one label, RGB for
  three, RGBA or a TIFF for more); a label is present where its channel is not 0. A binary
  mask of 0 and 255 is this with one label.
- ``'masks'``: masks/<label>/<stem>.png, one binary mask per label (not 0: present), in a folder
  named after the label (``class_names``); a label whose file is missing is absent there.

Without splits/, each stem goes to a split by a hash of the stem and ``split_seed``, in the
proportions of ``split_ratios``: the same files always give the same split, and adding files
never moves the old ones.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from segtrain.data.files import file_dataset
from segtrain.data.info import default_palette
from segtrain.data.raw import BadExample, Example, Problem, Source, pair_by_stem, pair_listed, read_mask_channels
from segtrain.errors import SegtrainError
from segtrain.task import check_multilabel, pack_np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


@file_dataset
class Folder(Source):
    """Your own images/ + masks/ folders (class-index or RGB colour masks, or multi-label masks).

    Reading a prepared copy (data_dir) takes the classes from it; preparing or reading the raw
    files (source_dir) needs num_classes (or class_names/palette), and palette for RGB masks.
    """

    name = "folder"
    splits = ("train", "val", "test")
    layout = ("Expected images/<stem>.jpg|png and masks/<stem>.png (same stems), and optionally "
              "splits/<split>.txt.")

    def __init__(
        self,
        num_classes: int | None = None,
        class_names: Sequence[str] = (),
        palette: Sequence[Sequence[int]] = (),
        ignore_label: int = 255,
        ignore_colour: Sequence[int] | None = None,
        splits: Sequence[str] = ("train", "val", "test"),
        split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
        split_seed: int = 0,
        image_dir: str = "images",
        mask_dir: str = "masks",
        labels: str = "classes",
        channels: int | None = None,
        bit_depth: int = 8,
    ):
        if labels not in LABEL_LAYOUTS:
            raise SegtrainError(f"datasets.folder.labels={labels!r}: use one of {', '.join(map(repr, LABEL_LAYOUTS))} "
                                f"('classes': one class id per pixel; the others: multi-label masks).")
        num_classes = num_classes or len(class_names) or len(palette) or 0
        if len(split_ratios) != len(splits) or any(r < 0 for r in split_ratios) or not sum(split_ratios):
            raise SegtrainError(
                f"datasets.folder.split_ratios={tuple(split_ratios)} must give one non-negative ratio "
                f"per split in datasets.folder.splits={tuple(splits)}."
            )
        for what, given in (("class_names", class_names), ("palette", palette)):
            if given and len(given) != num_classes:
                raise SegtrainError(f"datasets.folder.{what} has {len(given)} entries for {num_classes} classes.")
        # Without classes (num_classes 0), only a prepared copy can be read: it holds them.
        self.class_names = tuple(class_names) or tuple(f"class_{i}" for i in range(num_classes))
        self.palette = tuple(tuple(int(v) for v in c) for c in palette) or default_palette(num_classes)
        self.ignore_label = ignore_label
        self.ignore_colour = tuple(ignore_colour) if ignore_colour else None
        self.splits = tuple(splits)
        self.split_ratios = tuple(float(r) for r in split_ratios)
        self.split_seed = split_seed
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.labels = labels
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise SegtrainError(f"datasets.folder.channels={channels!r}: the images' bands, an integer >= 1 (None: "
                                f"RGB photographs).")
        if bit_depth not in (8, 16):
            raise SegtrainError(f"datasets.folder.bit_depth={bit_depth!r}: use 8 or 16 (bits per band).")
        if bit_depth == 16 and channels is None:
            raise SegtrainError("datasets.folder.bit_depth = 16 needs datasets.folder.channels, the images' bands "
                                "(e.g. 1 for 16-bit grey, 4 for RGB + near infrared).")
        self.channels, self.bit_depth = channels, bit_depth
        self.multilabel = labels != "classes"
        if self.multilabel and self.class_names:
            check_multilabel(len(self.class_names), ignore_label, f"datasets.folder (labels={labels!r})")

    @property
    def num_classes(self) -> int:
        self.require_classes()
        return len(self.class_names)

    def require_classes(self) -> None:
        """The raw files need the classes (a prepared copy holds them)."""
        if not self.class_names:
            raise SegtrainError(
                "datasets.folder needs its classes: set datasets.folder.num_classes (or class_names, or "
                "palette for RGB masks), e.g. --gin_param='datasets.folder.num_classes = 3'."
            )

    def list_split(self, source_dir: str, split: str) -> tuple[list[Example], list[Problem]]:
        self.require_classes()  # before listing the files
        root = self.root(source_dir, (self.image_dir, self.mask_dir))
        images, problems = _by_stem(os.path.join(root, self.image_dir), IMAGE_EXTENSIONS)
        if self.labels == "masks":
            masks, mask_problems = self._label_masks(os.path.join(root, self.mask_dir))
        else:
            masks, mask_problems = _by_stem(os.path.join(root, self.mask_dir), MASK_EXTENSIONS)
        problems += mask_problems
        lists = os.path.join(root, "splits")
        if os.path.isdir(lists):
            ids = self.split_list(os.path.join(lists, f"{split}.txt"), split)
            examples, listed = pair_listed(ids, lambda k: images.get(k, os.path.join(root, self.image_dir, k + ".*")),
                                           lambda k: masks.get(k, os.path.join(root, self.mask_dir, k + ".png")))
            return examples, problems + listed
        examples, unpaired = pair_by_stem(images, masks)
        return [e for e in examples if self.split_of(e.key) == split], problems + unpaired

    def _label_masks(self, mask_root: str) -> tuple[dict[str, str], list[Problem]]:
        """'masks' layout: {stem: the first label's mask file of the stem}; the others are found
        from it (``raw_label``)."""
        found: dict[str, str] = {}
        problems = []
        if not any(os.path.isdir(os.path.join(mask_root, n)) for n in self.class_names):
            raise SegtrainError(f"datasets.folder.labels='masks': no label folder in {mask_root}: expected one folder "
                                f"per label named as datasets.folder.class_names ({', '.join(self.class_names)}), "
                                f"each holding <stem>.png binary masks.")
        for name in self.class_names:
            directory = os.path.join(mask_root, name)
            if os.path.isdir(directory):
                by_stem, more = _by_stem(directory, MASK_EXTENSIONS)
                problems += more
                for stem, path in by_stem.items():
                    found.setdefault(stem, path)
        return found, problems

    def raw_label(self, path: str) -> np.ndarray:
        if self.labels == "channels":
            return _pack_channels(read_mask_channels(path), len(self.class_names))
        if self.labels == "masks":
            mask_root, stem = os.path.dirname(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0]
            planes, shape = [], None
            for name in self.class_names:
                files = [os.path.join(mask_root, name, stem + e) for e in MASK_EXTENSIONS]
                present = next((f for f in files if os.path.isfile(f)), None)
                if present is None:
                    planes.append(None)
                    continue
                channels = read_mask_channels(present)
                if channels.shape[-1] != 1:
                    raise BadExample(f"{present}: a label's mask must have one channel, not {channels.shape[-1]}")
                if shape is not None and channels.shape[:2] != shape:
                    raise BadExample(f"{present} is {channels.shape[1]}x{channels.shape[0]}, but the other labels' "
                                     f"masks of '{stem}' are {shape[1]}x{shape[0]}")
                shape = channels.shape[:2]
                planes.append(channels[..., 0] != 0)
            packed = np.zeros(shape, np.uint8)
            for i, plane in enumerate(planes):
                if plane is not None:
                    packed |= plane.astype(np.uint8) << i
            return packed
        return super().raw_label(path)

    def split_of(self, stem: str) -> str:
        """The split a stem falls in without split lists (a stable hash, not the file order)."""
        digest = hashlib.sha1(f"{self.split_seed}:{stem}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64 * sum(self.split_ratios)
        for split, ratio in zip(self.splits, self.split_ratios):
            if u < ratio:
                return split
            u -= ratio
        return self.splits[-1]


LABEL_LAYOUTS = ("classes", "bits", "channels", "masks")


def _pack_channels(channels: np.ndarray, num_labels: int) -> np.ndarray:
    """A mask [H, W, L] (not 0: present) packed into label bits; BadExample if it has another
    number of channels than labels."""
    if channels.shape[-1] != num_labels:
        raise BadExample(f"the mask has {channels.shape[-1]} channel(s) for {num_labels} label(s) "
                         f"(datasets.folder.labels='channels': one channel per label)")
    return pack_np(channels != 0)


def _by_stem(directory: str, extensions: Sequence[str]) -> tuple[dict[str, str], list[Problem]]:
    found: dict[str, str] = {}
    problems = []
    for name in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in extensions or name.startswith("."):
            continue
        path = os.path.join(directory, name)
        if stem in found:
            problems.append(Problem(path, f"two files with the stem '{stem}' (also {found[stem]})"))
            continue
        found[stem] = path
    return found, problems
