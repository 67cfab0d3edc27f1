"""`segtrain prepare` end to end: worker processes, bad input, chosen splits, gin settings, then
training on the result."""

from __future__ import annotations

import json

import pytest

from segtrain.errors import SegtrainError
from tests.conftest import segtrain_cli, segtrain_main, tiny_flags
from tests.data import fabricate as F


@pytest.mark.slow
def test_prepare_then_train_on_two_replicas(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    trainval = [f"cat_{i}" for i in range(8)]
    F.pets(str(raw), {"trainval": trainval, "test": ["dog_1", "dog_2", "dog_3"]}, size=(40, 44))
    (raw / "images" / "cat_3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    args = ["prepare", "--dataset=oxford_iiit_pet", f"--source_dir={raw}", f"--data_dir={out}", "--num_workers=2"]

    failed = segtrain_cli(*args)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "error: oxford_iiit_pet in" in failed.stderr and "cat_3.jpg: corrupt or truncated image" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not (out / "oxford_iiit_pet" / "1.0.0").exists()

    done = segtrain_cli(*args, "--skip_bad_examples")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prepare trainval image 8/8" in done.stdout and "img/s" in done.stdout
    assert "Skipped 1 bad example(s)" in done.stdout and "trainval 7, test 3 examples" in done.stdout

    model_dir = tmp_path / "run"
    trained = segtrain_cli("train", f"--model_dir={model_dir}", "--cpu_replicas=2", *tiny_flags(
        "train.dataset = 'oxford_iiit_pet'", f"datasets.oxford_iiit_pet.data_dir = '{out}'",
        "train.train_split = 'trainval'", "train.eval_split = 'test'", "pipeline.resize = (36, 36)",
    ))
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = json.loads((model_dir / "eval_results_test.json").read_text())
    assert 0.0 <= results["mean_iou"] <= 1.0 and len(results["per_class_iou"]) == 3


def test_prepare_only_the_splits_asked_for(tmp_path):
    """Many users download Cityscapes' train and val only."""
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    F.cityscapes(str(raw), {"train": ["aachen_000000_000019", "bochum_000000_000313"],
                            "val": ["frankfurt_000000_000294"]})
    args = ["prepare", "--dataset=cityscapes", f"--source_dir={raw}", f"--data_dir={out}", "--num_workers=1"]
    refused = segtrain_main(*args)
    assert refused.returncode == 1 and "leftImg8bit/test for split 'test' does not exist" in refused.stderr
    done = segtrain_main(*args, "--splits=train,val")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Prepared cityscapes in" in done.stdout and "train 2, val 1 examples. Not prepared: test (--splits)." \
        in done.stdout
    again = segtrain_main(*args, "--splits=train,val")
    assert "already prepared in" in again.stdout and "(splits train, val)" in again.stdout
    unknown = segtrain_main(*args, "--splits=train,testing", "--overwrite")
    assert unknown.returncode == 1 and "--splits: dataset 'cityscapes' has no split 'testing'; it has train, val, test" \
        in unknown.stderr
    from registry import DATASETS

    with pytest.raises(SegtrainError, match=r"has no split 'test'; it has train, val\. To add it, run `segtrain "
                                            r"prepare --dataset=cityscapes` again with --overwrite"):
        DATASETS.original("cityscapes")("test", data_dir=str(out))


def test_prepare_takes_the_dataset_settings_from_gin(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    F.folder(str(raw), [f"img_{i}" for i in range(6)], num_classes=2)
    gin_file = tmp_path / "mine.gin"
    gin_file.write_text("datasets.folder.num_classes = 2\ndatasets.folder.class_names = ('sky', 'tree')\n"
                        "datasets.folder.splits = ('train',)\ndatasets.folder.split_ratios = (1.0,)\n"
                        f"datasets.folder.source_dir = '{raw}'\n")
    done = segtrain_main("prepare", "--dataset=folder", f"--gin_file={gin_file}", f"--data_dir={out}",
                         "--num_workers=1")
    assert done.returncode == 0, done.stderr[-2000:]
    from registry import DATASETS

    _, info = DATASETS.original("folder")("train", data_dir=str(out))
    assert info.class_names == ("sky", "tree") and info.num_examples == {"train": 6}
    shapes = segtrain_main("prepare", "--dataset=shapes", f"--data_dir={out}")
    assert shapes.returncode == 1 and "Dataset 'shapes' has no raw files to prepare; preparable datasets: " in shapes.stderr
    listed = shapes.stderr.split("preparable datasets: ")[1].strip().rstrip(".").split(", ")
    # Other tests may register more preparable datasets in this process; the built-in ones are all there.
    assert {"cityscapes", "folder", "oxford_iiit_pet", "voc2012", "voc2012_aug"} <= set(listed) and "shapes" not in listed
