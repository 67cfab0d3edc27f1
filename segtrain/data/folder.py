"""Your own data (``folder``): a folder of images and a folder of masks, matched by file stem.

Layout (``source_dir``)::

    images/<stem>.{jpg,jpeg,png,bmp,tif,tiff}
    masks/<stem>.png|tif          class-index PNG (grey or palettized: value = class id), or an
                                  RGB colour mask whose colours are listed in ``palette``
    splits/<split>.txt            optional: one stem per line, for every split

Without splits/, each stem goes to a split by a hash of the stem and ``split_seed``, in the
proportions of ``split_ratios``: the same files always give the same split, and adding files
never moves the old ones.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

from segtrain.data.files import file_dataset
from segtrain.data.info import default_palette
from segtrain.data.raw import Example, Problem, Source, pair_by_stem, pair_listed
from segtrain.errors import SegtrainError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


@file_dataset
class Folder(Source):
    """Your own images/ + masks/ folders (class-index or RGB colour masks).

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
    ):
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

    def split_of(self, stem: str) -> str:
        """The split a stem falls in without split lists (a stable hash, not the file order)."""
        digest = hashlib.sha1(f"{self.split_seed}:{stem}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64 * sum(self.split_ratios)
        for split, ratio in zip(self.splits, self.split_ratios):
            if u < ratio:
                return split
            u -= ratio
        return self.splits[-1]


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
