"""The Oxford-IIIT Pet dataset's trimaps (``oxford_iiit_pet``).

Layout (``source_dir`` is the directory holding both folders)::

    images/<name>.jpg
    annotations/trimaps/<name>.png       values 1 pet, 2 background, 3 boundary
    annotations/{trainval,test}.txt      "<name> <class id> <species> <breed id>" per line

The trimap values 1, 2, 3 become classes 0 (pet), 1 (background), 2 (boundary), as in Keras'
Oxford-IIIT Pet segmentation example. With ``boundary_as_ignore=True`` the boundary becomes the ignore label and the
dataset has 2 classes; that choice is made when reading, so one prepared copy serves both.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from segtrain.data.files import file_dataset
from segtrain.data.info import DatasetInfo
from segtrain.data.raw import INVALID, Example, Problem, Source, pair_listed

CLASS_NAMES = ("pet", "background", "boundary")
PALETTE = ((220, 20, 60), (0, 0, 0), (250, 170, 30))


@file_dataset
class OxfordIiitPet(Source):
    """Oxford-IIIT Pet trimaps: pet, background, boundary (or 2 classes + ignore).

    Splits trainval (3,680) and test (3,669). Set data_dir (prepared) or source_dir (raw; slower).
    boundary_as_ignore: the boundary becomes the ignore label (2 classes); chosen when reading.
    Source: Parkhi et al., Cats and Dogs, CVPR 2012.
    """

    name = "oxford_iiit_pet"
    splits = ("trainval", "test")
    class_names = CLASS_NAMES
    palette = PALETTE
    layout = "Expected images/*.jpg, annotations/trimaps/*.png and annotations/{trainval,test}.txt."

    def __init__(self, boundary_as_ignore: bool = False):
        self.boundary_as_ignore = boundary_as_ignore

    def list_split(self, source_dir: str, split: str) -> tuple[list[Example], list[Problem]]:
        root = self.root(source_dir, ("images", os.path.join("annotations", "trimaps")), ("", "oxford-iiit-pet"))
        ids = self.split_list(os.path.join(root, "annotations", f"{split}.txt"), split)
        return pair_listed(
            ids,
            lambda k: os.path.join(root, "images", f"{k}.jpg"),
            lambda k: os.path.join(root, "annotations", "trimaps", f"{k}.png"),
        )

    def label_lut(self) -> np.ndarray:
        lut = np.full(256, INVALID, np.int16)
        lut[1:4] = (0, 1, 2)
        return lut

    def valid_raw_values(self) -> str:
        return "trimap values 1 (pet), 2 (background) or 3 (boundary)"

    def read_time_labels(self, info: DatasetInfo):
        if not self.boundary_as_ignore:
            return info, None
        # The border class becomes the ignore label: its pixels leave the class counts (the image
        # totals of the other classes still hold them, a small overestimate).
        new = dataclasses.replace(info, num_classes=2, class_names=info.class_names[:2], palette=info.palette[:2],
                                  class_pixel_counts={k: tuple(v[:2]) for k, v in info.class_pixel_counts.items()},
                                  class_image_pixels={k: tuple(v[:2]) for k, v in info.class_image_pixels.items()})
        return new, lambda label: tf.where(label == 2, tf.constant(info.ignore_label, tf.uint8), label)
