"""The built-in synthetic dataset follows the dataset contract and is reproducible."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from registry import DATASETS
from segtrain.errors import SegtrainError


def _examples(split="train", n=20, **config):
    ds, info = DATASETS.get("shapes")(split=split, **config)
    return [{k: v.numpy() for k, v in ex.items()} for ex in ds.take(n)], info


def _digest(ex):
    return hashlib.sha1(ex["image"].tobytes() + ex["label"].tobytes()).hexdigest()


def test_contract_dtypes_shapes_and_info():
    examples, info = _examples(min_size=40, max_size=70)
    assert info.num_classes == 4 and info.ignore_label == 255
    assert list(info.class_names) == ["background", "circle", "rectangle", "triangle"]
    assert len(info.palette) == 4 and info.num_examples["validation"] == 200
    sizes = set()
    seen = set()
    for ex in examples:
        image, label = ex["image"], ex["label"]
        assert image.dtype == np.uint8 and label.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3 and label.shape == image.shape[:2]
        assert 40 <= image.shape[0] <= 70 and 40 <= image.shape[1] <= 70
        sizes.add(image.shape[:2])
        seen |= set(np.unique(label).tolist())
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
    assert len(sizes) > 5, "image sizes must vary"
    assert seen == {0, 1, 2, 3}, "every class must appear"


def test_background_is_textured_and_noisy():
    (ex,), _ = _examples(n=1)
    background = ex["image"][ex["label"] == 0].astype(float)
    assert background.std(axis=0).mean() > 5


@pytest.mark.slow
def test_deterministic_for_a_seed_and_different_across_seeds():
    a, _ = _examples(n=5, seed=3)
    b, _ = _examples(n=5, seed=3)
    c, _ = _examples(n=5, seed=4)
    assert [_digest(x) for x in a] == [_digest(x) for x in b]
    assert not {_digest(x) for x in a} & {_digest(x) for x in c}


@pytest.mark.slow
def test_splits_never_share_examples():
    digests = {}
    for split in ("train", "validation", "test"):
        examples, _ = _examples(split, n=30, num_train=30, num_validation=30, num_test=30)
        digests[split] = {_digest(x) for x in examples}
        assert len(digests[split]) == 30
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]


def test_split_sizes():
    ds, info = DATASETS.get("shapes")(split="validation", num_validation=7)
    assert sum(1 for _ in ds) == 7 == info.num_examples["validation"]


def test_outlines_get_the_ignore_label():
    plain, _ = _examples(n=3, seed=1)
    outlined, _ = _examples(n=3, seed=1, outline_width=1)
    for p, o in zip(plain, outlined):
        ignored = o["label"] == 255
        assert ignored.any()
        # Outside the outlines the labels are unchanged, and the image does not change at all.
        assert np.array_equal(p["label"][~ignored], o["label"][~ignored])
        assert np.array_equal(p["image"], o["image"])


def test_unknown_split_is_a_clear_error():
    with pytest.raises(SegtrainError, match="no split 'val'.*train, validation, test"):
        DATASETS.get("shapes")(split="val")


def _colour_samples(examples):
    """(mean colour, class) of every shape class present in an example (a few pixels at least)."""
    colours, classes = [], []
    for ex in examples:
        for c in (1, 2, 3):
            mask = ex["label"] == c
            if mask.sum() > 4:
                colours.append(ex["image"][mask].astype(float).mean(0))
                classes.append(c)
    return np.array(colours), np.array(classes)


def _nearest_class_mean_accuracy(colours, classes):
    """How often an example's class colour is nearest its own class's mean colour."""
    means = np.stack([colours[classes == c].mean(0) for c in (1, 2, 3)])
    nearest = 1 + np.argmin(((colours[:, None] - means[None]) ** 2).sum(-1), axis=1)
    return float((nearest == classes).mean())


def test_random_colours_keep_the_geometry_and_break_the_colour_cue():
    config = dict(split="test", n=40, min_size=32, max_size=40, seed=2)
    plain, _ = _examples(**config)
    random, _ = _examples(**config, random_colours=True)
    for p, r in zip(plain, random):
        # The same shapes and labels, the same background: only the shapes' colours change.
        assert np.array_equal(p["label"], r["label"])
        background = p["label"] == 0
        assert np.array_equal(p["image"][background], r["image"][background])
    assert any(not np.array_equal(p["image"], r["image"]) for p, r in zip(plain, random))
    # By default a shape's colour gives its class away; with random colours it does not.
    plain_colours, classes = _colour_samples(plain)
    random_colours, random_classes = _colour_samples(random)
    assert np.array_equal(classes, random_classes) and set(classes) == {1, 2, 3}
    assert _nearest_class_mean_accuracy(plain_colours, classes) >= 0.9
    assert _nearest_class_mean_accuracy(random_colours, classes) <= 0.65
    spread = lambda colours: np.mean([colours[classes == c].std(0).mean() for c in (1, 2, 3)])  # noqa: E731
    assert spread(random_colours) > 1.4 * spread(plain_colours)
