"""Datasets and the shared input pipeline."""

from segtrain.data import shapes  # noqa: F401  (registers the built-in dataset)
from segtrain.data.info import DatasetInfo
from segtrain.data.pipeline import build_pipeline

__all__ = ["DatasetInfo", "build_pipeline"]
