"""Class weights from the data: `segtrain prepare` records pixel counts per class, the weighted
losses turn the training split's counts into median-frequency or inverse-frequency weights."""

from __future__ import annotations

import numpy as np
import pytest

from registry import DATASETS, LOSSES
from segtrain.errors import SegtrainError, SegtrainWarning
from segtrain.experiment import Experiment
from segtrain.losses import ClassStatistics, build_loss
from tests.conftest import segtrain_main, tiny_flags
from tests.data import fabricate as F

IGNORE = 255
NUM_CLASSES = 4  # the fabricated labels use 0..2 and 255: class 3 never appears
SPLITS = {"train": [f"train_{i}" for i in range(5)], "val": [f"val_{i}" for i in range(3)]}


def _fabricate(raw, size=(20, 24)) -> dict[str, dict[str, np.ndarray]]:
    """A `folder` dataset with split lists; returns {split: {stem: label}}."""
    labels = F.folder(str(raw), SPLITS["train"] + SPLITS["val"], num_classes=3, size=size)
    (raw / "splits").mkdir()
    for split, stems in SPLITS.items():
        (raw / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    (raw / "splits" / "test.txt").write_text(SPLITS["val"][0] + "\n")
    return {split: {s: labels[s] for s in stems} for split, stems in SPLITS.items()}


def _expected_counts(labels: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(pixels per class, labelled pixels of the images holding each class), by NumPy."""
    counts, image_pixels = np.zeros(NUM_CLASSES, np.int64), np.zeros(NUM_CLASSES, np.int64)
    for label in labels.values():
        per_value = np.bincount(label.ravel(), minlength=256)
        counts += per_value[:NUM_CLASSES]
        image_pixels += np.where(per_value[:NUM_CLASSES] > 0, (label != IGNORE).sum(), 0)
    return counts, image_pixels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(prepared data_dir, {split: {stem: label}}): the fabricated dataset, prepared once."""
    root = tmp_path_factory.mktemp("class_weights")
    labels = _fabricate(root / "raw")
    out = root / "prepared"
    done = segtrain_main("prepare", "--dataset=folder", f"--source_dir={root / 'raw'}", f"--data_dir={out}",
                         "--num_workers=1", f"--gin_param=datasets.folder.num_classes = {NUM_CLASSES}")
    assert done.returncode == 0, done.stderr[-2000:]
    return str(out), labels


def test_prepare_records_the_pixel_counts_of_each_split(prepared):
    data_dir, labels = prepared
    _, info = DATASETS.original("folder")("val", data_dir=data_dir)
    assert set(info.class_pixel_counts) == {"train", "val", "test"}
    for split in ("train", "val"):
        counts, image_pixels = _expected_counts(labels[split])
        assert list(info.class_pixel_counts[split]) == counts.tolist()
        assert list(info.class_image_pixels[split]) == image_pixels.tolist()
    assert info.class_pixel_counts["train"][3] == 0
    # Ignore-label pixels are in no class.
    total = sum(label.size for label in labels["train"].values())
    ignored = sum((label == IGNORE).sum() for label in labels["train"].values())
    assert 0 < ignored and sum(info.class_pixel_counts["train"]) == total - ignored


def _numpy_weights(method: str, labels: dict[str, np.ndarray]) -> np.ndarray:
    counts, image_pixels = _expected_counts(labels)
    present = counts > 0
    weights = np.zeros(NUM_CLASSES)
    if method == "median_frequency":
        freq = counts[present] / image_pixels[present]
        weights[present] = np.median(freq) / freq
    else:
        weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, (2, 6, 7)).astype(np.int32)
    labels[0, 0] = IGNORE
    return labels, rng.normal(size=(2, 6, 7, NUM_CLASSES)).astype(np.float32)


@pytest.mark.parametrize("method", ["median_frequency", "inverse_frequency"])
def test_weights_from_the_training_split_match_numpy(prepared, configure, capsys, method):
    data_dir, labels = prepared
    configure("train.dataset = 'folder'", f"datasets.folder.data_dir = '{data_dir}'",
              "train.loss = 'weighted_cross_entropy'", f"losses.weighted_cross_entropy.class_weights = '{method}'",
              "train.eval_split = 'val'")
    expected = _numpy_weights(method, labels["train"])
    with pytest.warns(SegtrainWarning, match=f"classes class_3 have no pixel in split 'train' of dataset "
                                             f"'folder'; their {method} weight is 0"):
        loss = Experiment().loss_fn  # built for the evaluated split: the weights still come from train
    printed = capsys.readouterr().out
    assert f"Class weights ({method}, split 'train' of dataset 'folder'): class_0 {expected[0]:.4g}, " in printed
    assert printed.strip().endswith("class_3 0")
    batch = _batch()
    reference = LOSSES.get("weighted_cross_entropy")(ignore_label=IGNORE, class_weights=expected.tolist())
    np.testing.assert_allclose(loss(*batch).numpy(), reference(*batch).numpy(), rtol=1e-5)


def test_weight_formulas_on_known_counts():
    from segtrain.losses import inverse_frequency_weights, median_frequency_weights

    # freq = 10/100, 30/40, 5/50 -> median 0.1; class 3 absent.
    np.testing.assert_allclose(median_frequency_weights([10, 30, 5, 0], [100, 40, 50, 0]),
                               [1.0, 0.1 / 0.75, 1.0, 0.0])
    # 45 pixels over 3 present classes: a class of 15 pixels weighs 1.
    np.testing.assert_allclose(inverse_frequency_weights([10, 30, 5, 0]), [1.5, 0.5, 3.0, 0.0])


def test_a_dataset_without_counts_says_to_prepare_it(configure):
    configure("train.loss = 'weighted_cross_entropy'",
              "losses.weighted_cross_entropy.class_weights = 'median_frequency'")
    with pytest.raises(SegtrainError, match=r"class_weights='median_frequency' needs the pixel counts per class "
                                            r"that `segtrain prepare` records, and split 'train' of dataset "
                                            r"'shapes' has none: run `segtrain prepare --dataset=shapes` .*"
                                            r"or give explicit weights"):
        Experiment().loss_fn


def test_unknown_weight_method_is_named():
    with pytest.raises(SegtrainError, match=r"class_weights='median': use a list of weights, 'batch', "
                                            r"'median_frequency' or 'inverse_frequency'"):
        LOSSES.get("weighted_cross_entropy")(ignore_label=IGNORE, class_weights="median")


def test_statistics_reach_only_the_losses_that_take_them(configure, capsys):
    stats = ClassStatistics(("a", "b", "c", "d"), (10, 30, 5, 0), (100, 40, 50, 0), dataset="x")
    batch = _batch(1)
    # Losses without the argument are built as before.
    np.testing.assert_allclose(build_loss("dice", IGNORE, stats)(*batch).numpy(),
                               LOSSES.get("dice")(ignore_label=IGNORE)(*batch).numpy())
    # combined hands them on to its parts that take them.
    configure("losses.weighted_cross_entropy.class_weights = 'median_frequency'", tiny=False)
    with pytest.warns(SegtrainWarning, match="classes d have no pixel"):
        combined = LOSSES.get("combined")(ignore_label=IGNORE, weights={"weighted_cross_entropy": 1.0, "dice": 1.0},
                                          class_statistics=stats)
    assert "Class weights (median_frequency, split 'train' of dataset 'x'): a 1, b 0.1333, c 1, d 0" in capsys.readouterr().out
    weighted = LOSSES.get("weighted_cross_entropy")(ignore_label=IGNORE, class_weights=[1.0, 0.1 / 0.75, 1.0, 0.0])
    np.testing.assert_allclose(combined(*batch).numpy(),
                               (weighted(*batch) + LOSSES.get("dice")(ignore_label=IGNORE)(*batch)).numpy(), rtol=1e-5)


@pytest.mark.slow
def test_training_prints_the_weights(tmp_path):
    """End to end: prepare with worker processes, then train with data-derived weights."""
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    labels = _fabricate(raw, size=(36, 40))
    done = segtrain_main("prepare", "--dataset=folder", f"--source_dir={raw}", f"--data_dir={out}",
                         "--num_workers=2", f"--gin_param=datasets.folder.num_classes = {NUM_CLASSES}")
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.warns(SegtrainWarning, match="classes class_3 have no pixel"):
        trained = segtrain_main("train", f"--model_dir={tmp_path / 'run'}", *tiny_flags(
            "train.dataset = 'folder'", f"datasets.folder.data_dir = '{out}'", "train.eval_split = 'val'",
            "train.loss = 'weighted_cross_entropy'", "losses.weighted_cross_entropy.class_weights = 'median_frequency'",
            "train.batch_size = 2", "train.num_steps = 2", "train.eval_every = 2", "train.steps_per_loop = 2",
        ))
    assert trained.returncode == 0, trained.stderr[-3000:]
    expected = _numpy_weights("median_frequency", labels["train"])
    assert (f"Class weights (median_frequency, split 'train' of dataset 'folder'): class_0 {expected[0]:.4g}, "
            in trained.stdout)
