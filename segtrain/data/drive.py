"""DRIVE retinal vessels (``drive``): vessel against background, inside the field of view.

Layout (``source_dir`` may be DRIVE/ or the directory holding it)::

    DRIVE/training/images/<n>_training.tif        565x584 RGB (n = 21..40)
    DRIVE/training/1st_manual/<n>_manual1.gif     first observer's vessels: 255 vessel, 0 not
    DRIVE/training/mask/<n>_training_mask.gif     field of view: 255 inside, 0 outside
    DRIVE/test/images/<n>_test.tif                (n = 01..20), with 1st_manual/<n>_manual1.gif
    DRIVE/test/mask/<n>_test_mask.gif              and mask/<n>_test_mask.gif

Classes: 0 background, 1 vessel (the first observer's annotation, > 127); pixels outside the
field of view are the ignore label, so losses and metrics count the retina only, as DRIVE's
results are reported. The TIFF images are re-encoded as PNG when prepared.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from segtrain.data.files import file_dataset
from segtrain.data.raw import BadExample, Example, Problem, Source, _open
from segtrain.errors import SegtrainError

SPLIT_DIRS = {"train": "training", "test": "test"}


@file_dataset
class Drive(Source):
    """DRIVE retinal vessel segmentation: background and vessel, outside the field of view ignored.

    Splits train (20 images) and test (20). Set data_dir (prepared) or source_dir (raw; slower).
    Source: Staal et al., Ridge-based vessel segmentation in color images of the retina, IEEE TMI 2004.
    """

    name = "drive"
    splits = ("train", "test")
    class_names = ("background", "vessel")
    palette = ((0, 0, 0), (255, 255, 255))
    ignore_colour = None
    layout = ("Expected DRIVE/{training,test}/images/<n>_<split>.tif, 1st_manual/<n>_manual1.gif and "
              "mask/<n>_<split>_mask.gif.")

    def list_split(self, source_dir: str, split: str) -> tuple[list[Example], list[Problem]]:
        root = self.root(source_dir, ("training",), ("", "DRIVE"))
        base = os.path.join(root, SPLIT_DIRS[split])
        for folder in ("images", "1st_manual", "mask"):
            if not os.path.isdir(os.path.join(base, folder)):
                hint = (" (a DRIVE copy without the test annotations: prepare the train split alone with "
                        "--splits=train)" if folder == "1st_manual" and split == "test" else "")
                raise SegtrainError(f"drive: directory {os.path.join(base, folder)} for split '{split}' does not "
                                    f"exist{hint}. {self.layout}")
        examples, problems = [], []
        suffix = f"_{SPLIT_DIRS[split]}.tif"
        for image in sorted(glob.glob(os.path.join(base, "images", "*" + suffix))):
            key = os.path.basename(image)[: -len(suffix)]
            label, fov = os.path.join(base, "1st_manual", f"{key}_manual1.gif"), fov_path(base, key, split)
            missing = [p for p in (label, fov) if not os.path.isfile(p)]
            if missing:
                problems.append(Problem(image, f"no {' and no '.join(missing)}"))
            else:
                examples.append(Example(key, image, label))
        return examples, problems

    def raw_label(self, path: str) -> np.ndarray:
        base, key = os.path.dirname(os.path.dirname(path)), os.path.basename(path).split("_")[0]
        split = next(s for s, d in SPLIT_DIRS.items() if os.path.basename(base) == d)
        with _open(path, "label") as image:
            vessels = np.asarray(image.convert("L")) > 127
        try:
            with _open(fov_path(base, key, split), "field-of-view mask") as image:
                inside = np.asarray(image.convert("L")) > 127
        except BadExample as e:
            raise BadExample(f"{e} ({fov_path(base, key, split)})") from None
        if inside.shape != vessels.shape:
            raise BadExample(f"its field-of-view mask {fov_path(base, key, split)} is "
                             f"{inside.shape[1]}x{inside.shape[0]}, the label {vessels.shape[1]}x{vessels.shape[0]}")
        return np.where(inside, vessels.astype(np.uint8), np.uint8(self.ignore_label))


def fov_path(split_dir: str, key: str, split: str) -> str:
    return os.path.join(split_dir, "mask", f"{key}_{SPLIT_DIRS[split]}_mask.gif")
