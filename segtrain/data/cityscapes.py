"""Cityscapes fine annotations (``cityscapes``), 19 training classes.

Layout (``source_dir`` holds both folders)::

    leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The label ids 0..33 become the 19 train ids of the official label table (cityscapesScripts'
labels.py); every other id (void, and the classes not used for training) becomes 255.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from segtrain.data.files import file_dataset
from segtrain.data.raw import INVALID, Example, Problem, Source, pair_by_stem

# (label id, train id, name, colour) of the 19 training classes.
TRAIN_CLASSES = (
    (7, 0, "road", (128, 64, 128)),
    (8, 1, "sidewalk", (244, 35, 232)),
    (11, 2, "building", (70, 70, 70)),
    (12, 3, "wall", (102, 102, 156)),
    (13, 4, "fence", (190, 153, 153)),
    (17, 5, "pole", (153, 153, 153)),
    (19, 6, "traffic light", (250, 170, 30)),
    (20, 7, "traffic sign", (220, 220, 0)),
    (21, 8, "vegetation", (107, 142, 35)),
    (22, 9, "terrain", (152, 251, 152)),
    (23, 10, "sky", (70, 130, 180)),
    (24, 11, "person", (220, 20, 60)),
    (25, 12, "rider", (255, 0, 0)),
    (26, 13, "car", (0, 0, 142)),
    (27, 14, "truck", (0, 0, 70)),
    (28, 15, "bus", (0, 60, 100)),
    (31, 16, "train", (0, 80, 100)),
    (32, 17, "motorcycle", (0, 0, 230)),
    (33, 18, "bicycle", (119, 11, 32)),
)
NUM_LABEL_IDS = 34  # label ids 0..33; the license plate (-1) is not stored in labelIds PNGs
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def label_id_to_train_id() -> np.ndarray:
    """[256] table: label id -> train id (255 for ids not trained on, INVALID beyond 33)."""
    lut = np.full(256, INVALID, np.int16)
    lut[:NUM_LABEL_IDS] = 255
    for label_id, train_id, _, _ in TRAIN_CLASSES:
        lut[label_id] = train_id
    return lut


@file_dataset
class Cityscapes(Source):
    """Cityscapes fine annotations, 19 classes (train ids), everything else ignored (255).

    Splits train (2,975), val (500), test (1,525; its labels are all ignore). Images are
    2048x1024. Set data_dir (prepared) or source_dir (raw; slower).
    Source: Cordts et al., The Cityscapes Dataset for Semantic Urban Scene Understanding, CVPR 2016.
    """

    name = "cityscapes"
    splits = ("train", "val", "test")
    class_names = tuple(c[2] for c in TRAIN_CLASSES)
    palette = tuple(c[3] for c in TRAIN_CLASSES)
    layout = ("Expected leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
              "gtFine/<split>/<city>/*_gtFine_labelIds.png.")

    def list_split(self, source_dir: str, split: str) -> tuple[list[Example], list[Problem]]:
        root = self.root(source_dir, ("leftImg8bit", "gtFine"), ("", "cityscapes"))
        image_dir, label_dir = self.split_dirs(split, *(os.path.join(root, d, split) for d in ("leftImg8bit", "gtFine")))
        images = {_key(p, image_dir, IMAGE_SUFFIX): p for p in glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX))}
        labels = {_key(p, label_dir, LABEL_SUFFIX): p for p in glob.glob(os.path.join(label_dir, "*", "*" + LABEL_SUFFIX))}
        return pair_by_stem(images, labels)

    def label_lut(self) -> np.ndarray:
        return label_id_to_train_id()

    def valid_raw_values(self) -> str:
        return f"Cityscapes label ids 0..{NUM_LABEL_IDS - 1}"


def _key(path: str, split_dir: str, suffix: str) -> str:
    return os.path.relpath(path, split_dir)[: -len(suffix)]
