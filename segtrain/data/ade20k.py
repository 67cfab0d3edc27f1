"""ADE20K as the MIT Scene Parsing benchmark defines it (``ade20k``): 150 classes.

Layout (``source_dir`` may be ADEChallengeData2016/ or the directory holding it)::

    ADEChallengeData2016/images/{training,validation}/ADE_<split>_<n>.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_<split>_<n>.png   values 0..150

Annotation value 0 ("other objects", not one of the 150) is the ignore label and v in 1..150
becomes class v - 1, as the benchmark scores it (MMSegmentation's ``reduce_zero_label``).
"""

from __future__ import annotations

import os

import numpy as np

from segtrain.data.files import file_dataset
from segtrain.data.info import default_palette
from segtrain.data.raw import INVALID, Example, Problem, Source, files_by_stem, pair_by_stem

# objectInfo150's order: class v - 1 is annotation value v.
CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
SPLIT_DIRS = {"train": "training", "val": "validation"}


@file_dataset
class Ade20k(Source):
    """ADE20K (SceneParsing, ADEChallengeData2016): 150 classes, annotation 0 ignored.

    Splits train (20,210) and val (2,000). Set data_dir (prepared) or source_dir (raw; slower).
    Source: Zhou et al., Scene Parsing through ADE20K Dataset, CVPR 2017.
    """

    name = "ade20k"
    splits = ("train", "val")
    class_names = CLASS_NAMES
    palette = default_palette(len(CLASS_NAMES))
    layout = ("Expected ADEChallengeData2016/images/{training,validation}/*.jpg and "
              "ADEChallengeData2016/annotations/{training,validation}/*.png.")

    def list_split(self, source_dir: str, split: str) -> tuple[list[Example], list[Problem]]:
        root = self.root(source_dir, ("images", "annotations"), ("", "ADEChallengeData2016"))
        image_dir, label_dir = self.split_dirs(split, *(os.path.join(root, d, SPLIT_DIRS[split])
                                                         for d in ("images", "annotations")))
        return pair_by_stem(files_by_stem(image_dir, ".jpg"), files_by_stem(label_dir, ".png"))

    def label_lut(self) -> np.ndarray:
        lut = np.full(256, INVALID, np.int16)
        lut[0] = self.ignore_label
        lut[1:len(CLASS_NAMES) + 1] = np.arange(len(CLASS_NAMES))
        return lut

    def valid_raw_values(self) -> str:
        return f"ADE20K annotation values 0 (other) .. {len(CLASS_NAMES)}"
