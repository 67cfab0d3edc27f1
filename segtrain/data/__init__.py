"""Datasets and the shared input pipeline."""

# Importing a dataset module registers its dataset.
from segtrain.data import ade20k, cityscapes, coco_stuff, drive, folder, pets, shapes, voc  # noqa: F401
from segtrain.data.info import DatasetInfo
from segtrain.data.pipeline import build_pipeline

__all__ = ["DatasetInfo", "build_pipeline"]
