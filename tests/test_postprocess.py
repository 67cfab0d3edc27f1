"""Post-processors: the dense CRF cleans a noisy mask, the watershed splits touching objects, and a
missing optional library is one error that says how to install it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from registry import POSTPROCESSORS
from segtrain import postprocess as P
from segtrain.errors import SegtrainError
from tests.conftest import REPO


def _two_regions(h=48, w=64, flip=0.2, seed=0):
    """(image, noisy probabilities, truth): a dark left half and a bright right half, and a
    softmax that is right on the truth except at a ``flip`` fraction of random pixels."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2:] = 1
    image = np.where(truth[..., None] == 1, 200.0, 40.0) + rng.normal(0, 5, (h, w, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    noisy = np.where(rng.random((h, w)) < flip, 1 - truth, truth)
    probabilities = np.where(np.eye(2)[noisy] == 1, 0.7, 0.3).astype(np.float32)
    return image, probabilities, truth


def test_dense_crf_cleans_a_noisy_two_region_mask():
    image, probabilities, truth = _two_regions()
    crf = P.build("dense_crf", need="probabilities")
    assert crf.refines and not crf.makes_instances
    out = crf(image, probabilities)
    refined = out["probabilities"]
    assert set(out) == {"probabilities"}
    assert refined.shape == probabilities.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(-1), 1.0, atol=1e-5)
    before = (probabilities.argmax(-1) != truth).mean()
    after = (refined.argmax(-1) != truth).mean()
    assert before > 0.15 and after < before / 4, (before, after)


def test_dense_crf_takes_its_settings_from_gin(configure):
    configure("postprocessors.dense_crf.iterations = 0", tiny=False)
    with pytest.raises(SegtrainError, match=r"postprocessors\.dense_crf\.iterations must be an integer >= 1, got 0"):
        P.build("dense_crf")
    configure("postprocessors.dense_crf.bilateral_compat = 0.0", "postprocessors.dense_crf.gaussian_compat = 0.0",
              tiny=False)
    # Without pairwise terms the CRF keeps the model's own (clipped) softmax.
    image, probabilities, _ = _two_regions(h=16, w=16)
    np.testing.assert_allclose(P.build("dense_crf")(image, probabilities)["probabilities"], probabilities, atol=1e-4)


@pytest.mark.parametrize("plugin, module, extra", [
    ("dense_crf", "pydensecrf.densecrf", "crf"),
    ("watershed_instances", "skimage.segmentation", "instances"),
])
def test_missing_library_says_how_to_install_it(monkeypatch, plugin, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(SegtrainError, match=rf"The {plugin} post-processor needs .*pip install 'segtrain\[{extra}\]'"):
        P.build(plugin)


def test_importing_the_plugins_needs_neither_optional_library():
    code = ("import sys, segtrain.postprocess; "
            "print(sorted(m for m in ('pydensecrf', 'skimage', 'tensorflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def _disc(cy, cx, r, size=64):
    y, x = np.mgrid[:size, :size]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def _softmax_of(label, num_classes=2):
    return np.eye(num_classes, dtype=np.float32)[label]


@pytest.mark.parametrize("discs, count", [
    ([(32, 22, 10), (32, 40, 10)], 2),  # touching: joined by a neck
    ([(16, 16, 8), (46, 46, 8)], 2),  # apart
    ([(32, 32, 12)], 1),
])
def test_watershed_makes_one_instance_per_disc(discs, count):
    label = np.zeros((64, 64), np.int64)
    for disc in discs:
        label[_disc(*disc)] = 1
    splitter = P.build("watershed_instances", need="instances")
    assert splitter.makes_instances and not splitter.refines
    out = splitter(np.zeros((64, 64, 3), np.uint8), _softmax_of(label))
    assert set(out) == {"instances"} and set(out["instances"]) == {1}
    instances = out["instances"][1]
    assert instances.dtype == np.int32 and instances.shape == (64, 64)
    assert sorted(np.unique(instances)) == list(range(count + 1))
    assert ((instances > 0) == (label == 1)).all()  # every object pixel is in an instance
    centres = {int(instances[cy, cx]) for cy, cx, _ in discs}
    assert len(centres) == count and 0 not in centres


def test_an_object_without_a_seed_is_still_one_instance():
    label = _disc(2, 2, 6).astype(np.int64)  # its centre is too close to the border for a seed
    instances = P.watershed_instances(exclude_border=True, min_size=0)(
        np.zeros((64, 64, 3), np.uint8), _softmax_of(label))["instances"][1]
    assert instances.max() == 1 and ((instances == 1) == (label == 1)).all()


def test_watershed_classes_background_and_min_size(configure):
    label = np.zeros((64, 64), np.int64)
    label[_disc(20, 20, 8)] = 1
    label[_disc(44, 44, 8)] = 2
    label[2:4, 60:62] = 2  # a 4-pixel fragment
    image, probabilities = np.zeros((64, 64, 3), np.uint8), _softmax_of(label, 3)
    out = P.watershed_instances()(image, probabilities)["instances"]
    assert set(out) == {1, 2} and out[1].max() == 1 and out[2].max() == 1 and out[2][2, 60] == 0
    kept = P.watershed_instances(min_size=0)(image, probabilities)["instances"]
    assert kept[2].max() == 2
    assert set(P.watershed_instances(background=None)(image, probabilities)["instances"]) == {0, 1, 2}
    configure("postprocessors.watershed_instances.classes = [2]", tiny=False)
    assert set(P.build("watershed_instances")(image, probabilities)["instances"]) == {2}
    with pytest.raises(SegtrainError, match=r"classes names class\(es\) \[5\], but the model predicts 3 classes"):
        P.watershed_instances(classes=[5])(image, probabilities)


def test_a_command_refuses_a_postprocessor_without_the_output_it_needs():
    with pytest.raises(SegtrainError, match=r"--postprocess=watershed_instances: watershed_instances makes "
                                            r"instances, not a refined mask: use it with `segtrain predict`\."):
        P.build("watershed_instances", need="probabilities")
    with pytest.raises(SegtrainError, match="dense_crf refines the mask and makes no instances"):
        P.build("dense_crf", need="instances")


def test_both_are_registered_and_inputs_are_checked():
    assert {"dense_crf", "watershed_instances"} <= set(POSTPROCESSORS.names())
    crf = P.build("dense_crf")
    with pytest.raises(ValueError, match=r"image must be uint8 \[H, W, 3\]"):
        crf(np.zeros((8, 8, 3), np.float32), np.full((8, 8, 2), 0.5, np.float32))
    with pytest.raises(ValueError, match="at the image's size"):
        crf(np.zeros((8, 8, 3), np.uint8), np.full((8, 9, 2), 0.5, np.float32))
