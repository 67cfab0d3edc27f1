"""Images too large for memory: regions read from TIFF segments, predicted and written tile by tile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from segtrain import tiles
from tests.conftest import REPO, assert_user_error, segtrain_main


def _smooth(h, w, seed=0, channels=3):
    """A smooth random image (shapes the model can see), uint8 [h, w, channels]."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), channels), np.uint8)
    return np.asarray(Image.fromarray(small.squeeze()).resize((w, h), Image.BILINEAR)).reshape(h, w, channels)


@pytest.mark.parametrize("layout", ["tiled", "stripped", "grey", "rgba"])
def test_regions_decode_only_their_segments_and_equal_the_pixels(tmp_path, layout):
    channels = {"grey": 1, "rgba": 4}.get(layout, 3)
    pixels = _smooth(150, 130, channels=channels)
    path = str(tmp_path / "image.tif")
    options = {"tile": (32, 48)} if layout in ("tiled", "rgba") else {"rowsperstrip": 20}
    tifffile.imwrite(path, pixels.squeeze(), compression="zlib", **options)
    reader = tiles.TiffRegions(path, cache_bytes=4 * 32 * 48 * channels)
    expected = np.repeat(pixels, 3, -1) if channels == 1 else pixels[..., :3]
    rng = np.random.default_rng(1)
    for _ in range(20):
        top, left = rng.integers(0, 149), rng.integers(0, 129)
        bottom, right = rng.integers(top + 1, 151), rng.integers(left + 1, 131)
        np.testing.assert_array_equal(reader.read(top, left, bottom, right), expected[top:bottom, left:right])
    assert len(reader._cache) <= 4 or layout != "tiled"  # the cache stays within its bytes
    reader.close()
    assert tiles.image_size(path) == (150, 130)


def test_unsupported_tiffs_are_refused_by_name(tmp_path):
    path = str(tmp_path / "deep.tif")
    tifffile.imwrite(path, np.zeros((20, 20), np.uint16))
    with pytest.raises(Exception, match=r"deep.tif: a TIFF of uint16 with 1 sample\(s\) per pixel"):
        tiles.TiffRegions(path)


def test_tiles_of_a_large_image_equal_whole_image_sliding_windows(trained_run, tmp_path):
    """A TIFF predicted tile by tile (tiles that windows straddle, a last row and column of
    partial tiles) gives the masks and probabilities of the whole image's slide inference."""
    pixels = _smooth(181, 203, seed=3)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "scene.tif", pixels, tile=(64, 64), compression="zlib")
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    window = ["--mode=slide", "--crop_size=48,48", "--stride=32,32"]
    tiled = segtrain_main("predict", f"--model_dir={trained_run}", f"--input={tmp_path / 'in'}",
                          f"--output={tmp_path / 'tiled'}", "--probabilities", *window,
                          "--gin_param=predict.large_image_pixels = 0", "--gin_param=predict.tile_size = 80")
    assert tiled.returncode == 0, tiled.stderr[-3000:]
    assert "scene.tif: 203x181, tile by tile (80x80 tiles, windows 48x48 every 32x32)" in tiled.stdout
    assert "predict scene.tif tile 9/9" in tiled.stdout, tiled.stdout
    whole = segtrain_main("predict", f"--model_dir={trained_run}", f"--input={tmp_path / 'scene.png'}",
                          f"--output={tmp_path / 'whole'}", "--probabilities", *window)
    assert whole.returncode == 0, whole.stderr[-3000:]
    with tifffile.TiffFile(tmp_path / "tiled" / "scene.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (80, 80)
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        mask = page.asarray()
        colormap = page.colormap
    expected = np.asarray(Image.open(tmp_path / "whole" / "scene.png"))
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(np.load(tmp_path / "tiled" / "scene_probabilities.npy"),
                               np.load(tmp_path / "whole" / "scene_probabilities.npy"), atol=1e-5)
    palette = np.asarray(Image.open(tmp_path / "whole" / "scene_color.png"))
    np.testing.assert_array_equal((colormap.T[expected] // 257).astype(np.uint8), palette)
    summary = json.loads((tmp_path / "tiled" / "predictions.json").read_text())
    assert summary["written"] == {str(tmp_path / "in" / "scene.tif"): ["scene.tif", "scene_probabilities.npy"]}
    assert sorted(os.listdir(tmp_path / "tiled")) == ["predictions.json", "scene.tif", "scene_probabilities.npy"]


def test_large_images_refuse_what_needs_the_whole_image(trained_run, tmp_path):
    Image.fromarray(_smooth(40, 40)).save(tmp_path / "a.png")
    args = [f"--model_dir={trained_run}", f"--input={tmp_path / 'a.png'}", f"--output={tmp_path / 'out'}",
            "--gin_param=predict.large_image_pixels = 100"]
    assert_user_error(segtrain_main("predict", *args, "--flip"), "more than predict.large_image_pixels=100 pixels",
                      "does not support test-time augmentation (--scales/--flip)")
    assert_user_error(segtrain_main("predict", *args, "--gin_param=predict.tile_size = 100"),
                      "predict.tile_size=100: use a multiple of 16")


MEMORY_SCRIPT = """
import resource, sys
from segtrain.cli import main
code = main(["segtrain", "predict", *sys.argv[1:]])
print("PEAK_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
sys.exit(code)
"""


@pytest.mark.slow  # two processes, one of them predicting 36 million pixels
def test_peak_memory_is_bounded_by_the_tiles_not_the_image(trained_run, tmp_path):
    """A 6000 x 6000 TIFF (108 MB of pixels; its float32 image alone would be 432 MB, its logits
    as much again) costs less than 250 MB above predicting a 256 x 256 one."""
    size, tile = 6000, 512
    smooth = _smooth(tile, tile, seed=5)

    def tiles_of_the_image():
        for r in range(0, size, tile):
            for c in range(0, size, tile):
                yield np.roll(smooth, (r // 7 + c // 3) % tile, axis=1)

    tifffile.imwrite(tmp_path / "large.tif", tiles_of_the_image(), shape=(size, size, 3), dtype=np.uint8,
                     tile=(tile, tile), bigtiff=True)
    Image.fromarray(smooth[:256, :256]).save(tmp_path / "small.png")
    peaks = {}
    for name in ("small.png", "large.tif"):
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, f"--model_dir={trained_run}", f"--input={tmp_path / name}",
             f"--output={tmp_path / 'out'}", "--mode=slide", "--crop_size=256,256", "--batch_size=8",
             "--gin_param=predict.large_image_pixels = 0"],
            cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[name] = float(result.stdout.split("PEAK_MB")[-1])
    # Measured: 112 MB more (the 64 MB cache of decoded input tiles, one tile's logits, a batch
    # of windows); the whole image as float32 alone would be 432 MB.
    assert peaks["large.tif"] - peaks["small.png"] < 250, peaks
    with tifffile.TiffFile(tmp_path / "out" / "large.tif") as tif:
        assert tif.pages[0].shape == (size, size) and tif.pages[0].is_tiled
