"""Images of any bands and 8 or 16 bits: read as stored, prepared with their per-band statistics,
normalised by them, jittered only in the bands named RGB, taken by a model whose first
convolution is extended, and predicted, exported and explained end to end."""

from __future__ import annotations

import json
import os

import gin
import numpy as np
import pytest
import tensorflow as tf
import tifffile
from PIL import Image

from segtrain.data import folder
from segtrain.data.files import load
from segtrain.data.prepare import prepare, read_all
from segtrain.data.transforms import Normalization, jitter_and_normalize, jitter_bands_and_normalize
from segtrain.errors import SegtrainError
from segtrain.images import display, read_bands
from segtrain.models.model import with_input_channels
from tests.conftest import TINY, segtrain_main
from tests.models import tiny  # noqa: F401 (registers resnet_tiny)

STEMS = [f"tile_{i:02d}" for i in range(8)]


def _bands_tree(root, channels=4, size=(20, 24), seed=0):
    """images/<stem>.tif of ``channels`` uint16 bands, masks/<stem>.png of 3 classes (255 some)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "images")
    os.makedirs(root / "masks")
    pixels = {}
    for i, stem in enumerate(STEMS):
        h = size[0] + i % 2
        x = rng.integers(0, 40000, (h, size[1], channels)).astype(np.uint16)
        x[..., 0] += np.uint16(10000 * (i % 3))  # a class cue in band 0
        tifffile.imwrite(root / "images" / f"{stem}.tif", x, photometric="minisblack", planarconfig="contig")
        label = np.full((h, size[1]), i % 3, np.uint8)
        label[:2] = 255
        Image.fromarray(label).save(root / "masks" / f"{stem}.png")
        pixels[stem] = x
    return pixels


def _source(**settings):
    return folder.Folder(num_classes=3, splits=("train",), split_ratios=(1,), **settings)


# -- reading

def test_read_bands_reads_tiff_and_16_bit_png_as_stored_and_names_a_mismatch(tmp_path):
    x = np.arange(5 * 6 * 5, dtype=np.uint16).reshape(5, 6, 5) * 300
    tifffile.imwrite(tmp_path / "contig.tif", x, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(x, -1, 0), photometric="minisblack", planarconfig="separate")
    for name in ("contig.tif", "planar.tif"):
        np.testing.assert_array_equal(read_bands(str(tmp_path / name), 5, 16), x)
    grey = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(read_bands(str(tmp_path / "grey16.png"), 1, 16)[..., 0], grey)
    rgba = tf.io.encode_png(tf.constant(x[..., :4])).numpy()
    (tmp_path / "rgba16.png").write_bytes(rgba)
    np.testing.assert_array_equal(read_bands(str(tmp_path / "rgba16.png"), 4, 16), x[..., :4])
    with pytest.raises(SegtrainError, match=r"contig.tif: an image of 5 band\(s\) of uint16, but the dataset's images "
                                            r"have 4 band\(s\) of uint16"):
        read_bands(str(tmp_path / "contig.tif"), 4, 16)
    with pytest.raises(SegtrainError, match=r"grey16.png: an image of 1 band\(s\) of uint16, .* of uint8 \(8 bits\)"):
        read_bands(str(tmp_path / "grey16.png"), 1, 8)


def test_a_bands_folder_reads_and_prepares_pixel_for_pixel_with_its_statistics(tmp_path):
    pixels = _bands_tree(tmp_path / "raw")
    source = _source(channels=4, bit_depth=16)
    raw_ds, raw_info = load(source, "train", None, str(tmp_path / "raw"))
    prepare(source, str(tmp_path / "raw"), str(tmp_path / "out"), num_workers=1)
    # Read back without the settings: the prepared copy says how its images are stored.
    ds, info = load(_source(), "train", str(tmp_path / "out"), None)
    for d, i in ((raw_ds, raw_info), (ds, info)):
        assert (i.channels, i.image_dtype, i.rgb) == (4, "uint16", False)
        got = read_all(d, i)
        assert sorted(g["key"] for g in got) == STEMS
        for g in got:
            np.testing.assert_array_equal(g["image"], pixels[g["key"]])
    every = np.concatenate([p.reshape(-1, 4) for p in pixels.values()]).astype(np.float64)
    np.testing.assert_allclose(info.channel_mean["train"], every.mean(0))
    np.testing.assert_allclose(info.channel_std["train"], every.std(0))


def test_bad_bands_are_named(tmp_path):
    _bands_tree(tmp_path / "raw")
    tifffile.imwrite(tmp_path / "raw" / "images" / f"{STEMS[3]}.tif", np.zeros((21, 24, 3), np.uint16),
                     photometric="minisblack", planarconfig="contig")
    with pytest.raises(SegtrainError, match=rf"{STEMS[3]}.tif: an image of 3 band\(s\) of uint16, but the dataset's "
                                            rf"images have 4 band\(s\)"):
        prepare(_source(channels=4, bit_depth=16), str(tmp_path / "raw"), str(tmp_path / "out"), num_workers=1)
    with pytest.raises(SegtrainError, match="bit_depth = 16 needs datasets.folder.channels"):
        _source(bit_depth=16)
    # Raw files have no recorded statistics: the normalisation asks for them.
    from segtrain.commands.configure import parse_config
    from segtrain.experiment import Experiment

    os.remove(tmp_path / "raw" / "images" / f"{STEMS[3]}.tif")
    os.remove(tmp_path / "raw" / "masks" / f"{STEMS[3]}.png")
    gin.clear_config()
    parse_config([], ["train.dataset = 'folder'", "train.eval_split = 'train'",
                      f"datasets.folder.source_dir = '{tmp_path / 'raw'}'", "datasets.folder.channels = 4",
                      "datasets.folder.bit_depth = 16", "datasets.folder.num_classes = 3",
                      "datasets.folder.splits = ('train',)", "datasets.folder.split_ratios = (1,)"])
    with pytest.raises(SegtrainError, match=r"images of 4 band\(s\) of uint16: their normalisation needs each "
                                            r"band's mean and std. Prepare the dataset"):
        Experiment().normalization


# -- the pipeline and the model

def test_colour_jitter_changes_the_rgb_bands_alone_on_their_scale():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 65535, (6, 7, 5)).astype(np.float32)
    norm = Normalization(tuple(x.mean((0, 1))), tuple(x.std((0, 1))), max_value=65535.0)
    seed = tf.constant([3, 4], tf.int64)
    got = jitter_bands_and_normalize(x, seed, norm, (3, 1, 0), brightness=0.2, contrast=(0.7, 1.3)).numpy()
    np.testing.assert_allclose(got[..., [2, 4]], norm(x).numpy()[..., [2, 4]], rtol=1e-5)
    scale = 255.0 / 65535.0
    rgb = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    jittered = jitter_and_normalize(x[..., [3, 1, 0]] * scale, seed, rgb, brightness=0.2, contrast=(0.7, 1.3))
    expected = (jittered.numpy() / scale - np.asarray(norm.mean)[[3, 1, 0]]) / np.asarray(norm.std)[[3, 1, 0]]
    np.testing.assert_allclose(got[..., [3, 1, 0]], expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got[..., 3], norm(x).numpy()[..., 3])


@pytest.mark.slow  # trains, or builds models several times: the full tier
def test_the_first_convolution_is_extended_to_the_bands():
    from registry import MODELS

    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 16, 16, 3)).astype(np.float32)
    for name, settings in (("unet", {"depth": 2, "base_filters": 4}),
                           ("unet_encoder", {"backbone": "resnet_tiny"})):
        model = MODELS.get(name)(num_classes=3, **settings)
        five = with_input_channels(model, 5)
        assert five.input_shape[-1] == 5
        # Extra bands of zeros: the RGB model's own logits.
        np.testing.assert_allclose(five(np.concatenate([x, np.zeros_like(x[..., :2])], -1)), model(x), atol=1e-5)
        # One band: the response of its grey copy in R, G and B.
        grey = x[..., :1]
        np.testing.assert_allclose(with_input_channels(model, 1)(grey), model(np.repeat(grey, 3, -1)), atol=1e-4)
        # Named RGB bands: BGR input through (2, 1, 0) is the RGB model on RGB.
        bgr = with_input_channels(model, 3, (2, 1, 0))
        np.testing.assert_allclose(bgr(x[..., ::-1]), model(x), atol=1e-5)


def test_display_stretches_the_named_bands():
    x = np.zeros((2, 3, 4), np.uint16)
    x[..., 3] = [[100, 200, 300], [100, 200, 300]]
    shown = display(x, mean=[0, 0, 0, 200], std=[1, 1, 1, 40], channels=(3,))
    assert shown.shape == (2, 3, 3) and shown[0, 1].tolist() == [128, 128, 128] and shown[0, 0, 0] == 0
    with pytest.raises(SegtrainError, match=r"overlay channels \[4\]: name one or three of the image's 4 channels"):
        display(x, channels=(4,))


# -- end to end

@pytest.fixture(scope="module")
def bands_run(tmp_path_factory):
    """A tiny run on a prepared folder of 4-band uint16 TIFFs, with colour jitter on bands 2, 1, 0."""
    from segtrain.commands.configure import parse_config
    from segtrain.train.trainer import train

    root = tmp_path_factory.mktemp("bands")
    _bands_tree(root / "raw")
    result = segtrain_main("prepare", "--dataset=folder", f"--source_dir={root / 'raw'}", f"--data_dir={root / 'out'}",
                           "--gin_param=datasets.folder.channels = 4", "--gin_param=datasets.folder.bit_depth = 16",
                           "--gin_param=datasets.folder.num_classes = 3", "--gin_param=datasets.folder.splits = ('train',)",
                           "--gin_param=datasets.folder.split_ratios = (1,)")
    assert result.returncode == 0, result.stderr
    gin.clear_config()
    parse_config([], [*(b for b in TINY if not b.startswith("datasets.shapes")),
                      "train.dataset = 'folder'", "train.eval_split = 'train'",
                      f"datasets.folder.data_dir = '{root / 'out'}'", "datasets.folder.splits = ('train',)",
                      "datasets.folder.split_ratios = (1,)",
                      "train.batch_size = 2", "pipeline.crop_size = (16, 16)", "pipeline.rgb_channels = (2, 1, 0)",
                      "pipeline.brightness = 0.1"])
    train(str(root / "run"))
    gin.clear_config()
    return root


@pytest.mark.slow
def test_a_bands_run_predicts_exports_and_explains(bands_run):
    run, image = str(bands_run / "run"), str(bands_run / "raw" / "images" / f"{STEMS[0]}.tif")
    assert json.load(open(os.path.join(run, "eval_results_train.json")))["step"] == 6
    out = str(bands_run / "predicted")
    result = segtrain_main("predict", f"--model_dir={run}", f"--input={image}", f"--output={out}",
                           "--gin_param=predict.overlay_channels = (3,)")
    assert result.returncode == 0, result.stderr
    overlay = np.asarray(Image.open(os.path.join(out, f"{STEMS[0]}_overlay.jpg")))
    assert overlay.shape == (20, 24, 3)
    export = str(bands_run / "export")
    result = segtrain_main("export", f"--model_dir={run}", f"--output={export}")
    assert result.returncode == 0, result.stderr
    metadata = json.load(open(os.path.join(export, "segtrain_export.json")))
    assert (metadata["channels"], metadata["image_dtype"]) == (4, "uint16")
    assert metadata["check"]["label_agreement"] == 1.0 and "serving_bytes" not in metadata["signatures"]
    served = tf.saved_model.load(export).signatures["serving_default"]
    labels = served(images=tf.constant(tifffile.imread(image)[None]))["labels"].numpy()[0]
    np.testing.assert_array_equal(labels, np.asarray(Image.open(os.path.join(out, f"{STEMS[0]}.png"))))
    result = segtrain_main("explain", f"--model_dir={run}", f"--input={image}", "--class=1",
                           f"--output={bands_run / 'explained'}")
    assert result.returncode == 0, result.stderr
    refused = segtrain_main("predict", f"--model_dir={run}", f"--input={image}", f"--output={out}2",
                            "--gin_param=predict.large_image_pixels = 0")
    assert refused.returncode != 0 and "images of 4 band(s) of uint16" in refused.stderr
