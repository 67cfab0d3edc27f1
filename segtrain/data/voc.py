"""Pascal VOC 2012 segmentation (``voc2012``) and its SBD-augmented training set (``voc2012_aug``).

Layout (``source_dir`` may be the directory holding VOCdevkit/, VOCdevkit/ itself, or VOC2012/)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png        palettized: palette index = class id, 255 = boundary
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

``voc2012_aug`` adds the Semantic Boundaries Dataset (``sbd_dir``): either the SBD release
(``benchmark_RELEASE/dataset/cls/<id>.mat`` with train.txt/val.txt) or a folder of converted
class-index PNGs (``SegmentationClassAug/<id>.png``). Its train split is SBD's train and val plus
VOC's train, minus VOC's val: 10,582 images. An image with a VOC annotation uses it (it marks the
object boundaries with 255); the others use SBD's. Its val split is VOC's val (1,449 images).
"""

from __future__ import annotations

import glob
import os

import numpy as np

from segtrain.data.files import file_dataset
from segtrain.data.info import default_palette
from segtrain.data.raw import BadExample, Example, Problem, Source, pair_listed

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PALETTE = default_palette(21)  # VOC's bit-interleaved colour map
BOUNDARY_COLOUR = (224, 224, 192)  # index 255 in VOC's palette


@file_dataset
class Voc2012(Source):
    """Pascal VOC 2012 segmentation: 21 classes, 255 marks object boundaries (ignored).

    Splits train (1,464), val (1,449), trainval (2,913). Set data_dir (prepared by
    `segtrain prepare`) or source_dir (the raw VOCdevkit; slower).
    Source: Everingham et al., The PASCAL Visual Object Classes Challenge 2012.
    """

    name = "voc2012"
    splits = ("train", "val", "trainval")
    class_names = CLASS_NAMES
    palette = PALETTE
    ignore_colour = BOUNDARY_COLOUR
    layout = ("Expected VOCdevkit/VOC2012/ with JPEGImages/, SegmentationClass/ and "
              "ImageSets/Segmentation/{train,val,trainval}.txt.")

    def voc_root(self, source_dir: str) -> str:
        return self.root(source_dir, ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")),
                         ("", "VOC2012", os.path.join("VOCdevkit", "VOC2012")))

    def voc_ids(self, root: str, split: str) -> list[str]:
        return self.split_list(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), split)

    def list_split(self, source_dir: str, split: str) -> tuple[list[Example], list[Problem]]:
        root = self.voc_root(source_dir)
        return pair_listed(
            self.voc_ids(root, split),
            lambda k: os.path.join(root, "JPEGImages", f"{k}.jpg"),
            lambda k: os.path.join(root, "SegmentationClass", f"{k}.png"),
        )


@file_dataset
class Voc2012Aug(Voc2012):
    """VOC 2012 with SBD's extra annotations: train 10,582 ("trainaug"), val 1,449.

    Preparing (or reading raw) needs sbd_dir, the SBD release's dataset/ directory or a folder of
    converted class-index PNGs. Source: Hariharan et al., Semantic Contours from Inverse Detectors, ICCV 2011.
    """

    name = "voc2012_aug"
    splits = ("train", "val")

    def __init__(self, sbd_dir: str | None = None):
        self.sbd_dir = sbd_dir
        self.layout = (Voc2012.layout + " And datasets.voc2012_aug.sbd_dir: the SBD release's dataset/ directory "
                       "(cls/*.mat, train.txt, val.txt) or a folder of class-index PNGs (SegmentationClassAug).")

    def sbd_labels(self) -> dict[str, str]:
        """{image id: SBD label file}."""
        from segtrain.errors import SegtrainError

        if not self.sbd_dir:
            raise SegtrainError(
                "voc2012_aug needs the SBD annotations: set datasets.voc2012_aug.sbd_dir, e.g. --gin_param="
                "\"datasets.voc2012_aug.sbd_dir = '/data/benchmark_RELEASE/dataset'\", to the SBD release's "
                "dataset/ directory (cls/*.mat, train.txt, val.txt) or to a folder of class-index PNGs "
                "(SegmentationClassAug)."
            )
        sbd = os.path.expanduser(self.sbd_dir)
        if not os.path.isdir(sbd):
            raise SegtrainError(f"voc2012_aug: SBD directory {sbd} (datasets.voc2012_aug.sbd_dir) does not exist.")
        for candidate in ("", "dataset", os.path.join("benchmark_RELEASE", "dataset")):
            cls = os.path.join(sbd, candidate, "cls")
            if os.path.isdir(cls):
                lists = [os.path.join(sbd, candidate, f"{s}.txt") for s in ("train", "val")]
                if all(os.path.isfile(f) for f in lists):
                    ids = [i for f, s in zip(lists, ("train", "val")) for i in self.split_list(f, f"SBD {s}")]
                else:
                    ids = [os.path.basename(f)[:-4] for f in glob.glob(os.path.join(cls, "*.mat"))]
                return {i: os.path.join(cls, f"{i}.mat") for i in ids}
        pngs = glob.glob(os.path.join(sbd, "*.png"))
        if not pngs:
            raise SegtrainError(f"voc2012_aug: {sbd} holds neither cls/*.mat (the SBD release) nor *.png labels.")
        return {os.path.basename(f)[:-4]: f for f in pngs}

    def list_split(self, source_dir: str, split: str) -> tuple[list[Example], list[Problem]]:
        root = self.voc_root(source_dir)
        if split == "val":
            return Voc2012.list_split(self, source_dir, "val")
        val = set(self.voc_ids(root, "val"))
        voc_train = self.voc_ids(root, "train")
        sbd = self.sbd_labels()
        ids = sorted((set(sbd) | set(voc_train)) - val)
        voc_label = lambda k: os.path.join(root, "SegmentationClass", f"{k}.png")  # noqa: E731
        return pair_listed(
            ids,
            lambda k: os.path.join(root, "JPEGImages", f"{k}.jpg"),
            lambda k: voc_label(k) if k not in sbd or os.path.isfile(voc_label(k)) else sbd[k],
        )

    def raw_label(self, path: str) -> np.ndarray:
        if not path.endswith(".mat"):
            return super().raw_label(path)
        import scipy.io

        try:
            return np.asarray(scipy.io.loadmat(path)["GTcls"]["Segmentation"][0][0])
        except FileNotFoundError:
            raise BadExample("label file is missing") from None
        except Exception as e:
            raise BadExample(f"not an SBD cls .mat file with GTcls.Segmentation ({type(e).__name__}: {e})") from None
