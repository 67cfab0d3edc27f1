"""The experiment files pair models with datasets; each must configure a run that can start."""

from __future__ import annotations

import glob
import os

import gin
import pytest

from tests.conftest import REPO

EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "gin", "experiments", "*.gin")))
PAIRS = {("deeplabv3", "voc2012"), ("unet", "oxford_iiit_pet"), ("fcn8s", "cityscapes"),
         ("deeplabv3_plus", "cityscapes")}


def test_the_natural_pairs_have_experiment_files():
    names = {os.path.basename(p)[:-4] for p in EXPERIMENTS}
    assert {f"{m}_{d}" for m, d in PAIRS} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.basename(p))
def test_experiment_parses_and_names_its_plugins(path, tmp_path):
    import registry
    from segtrain.commands.configure import parse_config
    from segtrain.experiment import ExperimentConfig

    parse_config([path], [f"DATA_DIR = '{tmp_path}'"])
    cfg = ExperimentConfig()
    assert cfg.model in registry.MODELS.names() and cfg.dataset in registry.DATASETS.names()
    assert cfg.loss in registry.LOSSES.names()
    assert gin.query_parameter("%DATA_DIR") == str(tmp_path)
    # The dataset is read from DATA_DIR: with nothing prepared there, the message says what to run.
    with pytest.raises(Exception, match=rf"run `segtrain prepare --dataset={cfg.dataset}"):
        registry.DATASETS.get(cfg.dataset)(split=cfg.train_split)
    crop = gin.query_parameter("pipeline.crop_size")
    assert crop[0] % 32 == 0 and crop[1] % 32 == 0


DATASET_FILES = sorted(glob.glob(os.path.join(REPO, "gin", "datasets", "*.gin")))


@pytest.mark.parametrize("path", DATASET_FILES, ids=lambda p: os.path.basename(p))
def test_dataset_file_names_a_dataset_and_its_splits(path, tmp_path):
    import registry
    from segtrain.commands.configure import parse_config
    from segtrain.experiment import ExperimentConfig

    parse_config([path], [f"DATA_DIR = '{tmp_path}'"] if "DATA_DIR" in open(path).read() else [])
    cfg = ExperimentConfig()
    source = getattr(registry.DATASETS.original(cfg.dataset), "source", None)
    if source is not None:  # a file dataset: its splits are known without reading
        assert {cfg.train_split, cfg.eval_split} <= set(source.splits), path
        assert f"datasets.{cfg.dataset}.data_dir = %DATA_DIR" in open(path).read(), path
