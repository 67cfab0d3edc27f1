"""COCO-Stuff 164k (``coco_stuff``): 80 thing and 91 stuff classes, 171 in all.

Layout (``source_dir`` is the dataset/ directory of the COCO-Stuff set-up, or its parent)::

    images/{train2017,val2017}/<id>.jpg                 the COCO 2017 images
    annotations/{train2017,val2017}/<id>.png            stuffthingmaps_trainval2017: values 0..181, 255

The stuff-thing maps hold COCO category id - 1 (0..181) and 255 for unlabeled. Eleven thing
ids of COCO have no segmentation annotation (street sign, hat, shoe, eye glasses, plate,
mirror, window, desk, door, blender, hair brush); the 171 others become classes 0..170 in id
order, as the COCO-Stuff 164k benchmark counts them.
"""

from __future__ import annotations

import os

import numpy as np

from segtrain.data.files import file_dataset
from segtrain.data.info import default_palette
from segtrain.data.raw import INVALID, Example, Problem, Source, files_by_stem, pair_by_stem

THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain",
    "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea",
    "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)
CLASS_NAMES = THINGS + STUFF
# Map values (COCO category id - 1) of the thing categories without segmentation annotations.
UNANNOTATED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
NUM_VALUES = 182  # map values 0..181
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}


def map_value_to_class() -> np.ndarray:
    """[256] table: stuff-thing map value -> class id (255 stays the ignore label; INVALID for
    the unannotated thing ids and values above 181)."""
    lut = np.full(256, INVALID, np.int16)
    used = [v for v in range(NUM_VALUES) if v not in UNANNOTATED]
    lut[used] = np.arange(len(used))
    lut[255] = 255
    return lut


@file_dataset
class CocoStuff(Source):
    """COCO-Stuff 164k stuff-thing maps: 171 classes (80 things, 91 stuff), 255 unlabeled.

    Splits train (118,287) and val (5,000). Set data_dir (prepared) or source_dir (raw; slower).
    Source: Caesar et al., COCO-Stuff: Thing and Stuff Classes in Context, CVPR 2018.
    """

    name = "coco_stuff"
    splits = ("train", "val")
    class_names = CLASS_NAMES
    palette = default_palette(len(CLASS_NAMES))
    layout = ("Expected images/{train2017,val2017}/*.jpg and annotations/{train2017,val2017}/*.png "
              "(stuffthingmaps_trainval2017).")

    def list_split(self, source_dir: str, split: str) -> tuple[list[Example], list[Problem]]:
        root = self.root(source_dir, ("images", "annotations"), ("", "dataset"))
        image_dir, label_dir = self.split_dirs(split, *(os.path.join(root, d, SPLIT_DIRS[split])
                                                         for d in ("images", "annotations")))
        return pair_by_stem(files_by_stem(image_dir, ".jpg"), files_by_stem(label_dir, ".png"))

    def label_lut(self) -> np.ndarray:
        return map_value_to_class()

    def valid_raw_values(self) -> str:
        return ("COCO-Stuff map values 0..181 (less the unannotated thing ids "
                f"{', '.join(map(str, UNANNOTATED))}) or 255")
