"""Images too large for memory: read by region, inferred tile by tile, written tile by tile.

``segtrain predict`` sends an image here when it has more pixels than
``predict.large_image_pixels``. The output is cut into tiles of ``tile_size``; for each tile,
every sliding window of the whole image that overlaps it is read and inferred, and the window
logits are summed and divided by how many windows cover each pixel, exactly as
``Inference``'s ``slide`` mode does for the whole image (a window that overlaps several tiles
is inferred once per tile: the price of not holding the image's logits). The tile's labels go
straight into a tiled TIFF.

What stays in memory is one tile's logits, one batch of windows and a bounded cache of the
input's decoded TIFF tiles or strips (``TiffRegions``), not the image: a 20000 x 20000 TIFF
is read and written piece by piece. Other formats are decoded whole by Pillow (their pixels
only, uint8), then inferred tile by tile all the same.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from segtrain.errors import SegtrainError

TIFF_EXTENSIONS = (".tif", ".tiff")
CACHE_BYTES = 64 << 20  # decoded input segments kept (TIFF tiles or strips)


def require_tifffile():
    try:
        import tifffile
    except ImportError:
        raise SegtrainError("Reading and writing large TIFF images needs tifffile: "
                            "pip install 'segtrain[tiff]' (or pip install tifffile).") from None
    return tifffile


def is_tiff(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in TIFF_EXTENSIONS


def image_size(path: str) -> tuple[int, int] | None:
    """(height, width) from the file's header (TIFF through tifffile: any size), or None."""
    if is_tiff(path):
        try:
            tifffile = require_tifffile()
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        except SegtrainError:
            raise
        except Exception:
            pass  # not a TIFF tifffile reads: let Pillow try
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


class TiffRegions:
    """Regions of a TIFF's first page, decoding only the tiles or strips they touch.

    Decoded segments are kept in a least-recently-used cache of ``cache_bytes``. Pixels come
    out as uint8 RGB: grey is repeated, alpha dropped; other sample types are refused.
    """

    def __init__(self, path: str, cache_bytes: int = CACHE_BYTES):
        tifffile = require_tifffile()
        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
            page = self._page = self._tif.pages[0]
        except Exception as e:
            raise SegtrainError(f"{path}: not a readable TIFF ({e}).") from None
        samples = int(page.samplesperpixel)
        if page.dtype != np.uint8 or samples not in (1, 3, 4) or (
                samples > 1 and page.planarconfig != tifffile.PLANARCONFIG.CONTIG) or page.imagedepth != 1:
            self.close()
            planar = " in separate planes" if samples > 1 and page.planarconfig != tifffile.PLANARCONFIG.CONTIG else ""
            raise SegtrainError(
                f"{path}: a TIFF of {page.dtype} with {samples} sample(s) per pixel{planar}; predict reads "
                f"8-bit grey, RGB or RGBA images (interleaved).")
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.chunk = (int(page.chunks[0]), int(page.chunks[1]))  # a tile's, or a strip's (rows, width)
        self._columns = math.ceil(self.width / self.chunk[1])
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_bytes, self._cached = cache_bytes, 0

    def _segment(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        page = self._page
        fh = self._tif.filehandle
        fh.seek(page.dataoffsets[index])
        data = fh.read(page.databytecounts[index])
        try:
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as e:
            raise SegtrainError(f"{self.path}: damaged TIFF segment {index} ({e}).") from None
        segment = np.asarray(segment).reshape(segment.shape[-3], segment.shape[-2], -1)
        self._cache[index] = segment
        self._cached += segment.nbytes
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached -= dropped.nbytes
        return segment

    def read(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        """uint8 [bottom - top, right - left, 3] of the region."""
        ch, cw = self.chunk
        out = np.empty((bottom - top, right - left, self._page.samplesperpixel), np.uint8)
        for row in range(top // ch, (bottom - 1) // ch + 1):
            for col in range(left // cw, (right - 1) // cw + 1):
                segment = self._segment(row * self._columns + col)
                y0, x0 = row * ch, col * cw
                ys, ye = max(top, y0), min(bottom, y0 + ch, self.height)
                xs, xe = max(left, x0), min(right, x0 + cw, self.width)
                out[ys - top:ye - top, xs - left:xe - left] = segment[ys - y0:ye - y0, xs - x0:xe - x0]
        return _rgb(out)

    def close(self) -> None:
        self._tif.close()


class WholeImage:
    """The same interface over an image Pillow decodes whole (formats without random access)."""

    def __init__(self, path: str):
        from PIL import Image

        from segtrain import images

        guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the user asked for this image
        try:
            self.pixels = images.read_rgb(path)
        finally:
            Image.MAX_IMAGE_PIXELS = guard
        self.height, self.width = self.pixels.shape[:2]

    def read(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        return self.pixels[top:bottom, left:right]

    def close(self) -> None:
        self.pixels = None


def open_regions(path: str):
    return TiffRegions(path) if is_tiff(path) else WholeImage(path)


def _rgb(pixels: np.ndarray) -> np.ndarray:
    if pixels.shape[-1] == 1:
        return np.repeat(pixels, 3, axis=-1)
    return pixels[..., :3]


def tile_grid(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Output tiles (top, left, bottom, right) in raster order, the TIFF's tile order."""
    return [(t, left, min(t + tile, height), min(left + tile, width))
            for t in range(0, height, tile) for left in range(0, width, tile)]


def _overlapping(starts: Sequence[int], size: int, lo: int, hi: int) -> list[int]:
    return [s for s in starts if s < hi and s + size > lo]


def predict_tiles(reader, window_logits: Callable[[np.ndarray], np.ndarray], num_classes: int,
                  crop_size: Sequence[int], stride: Sequence[int], tile: int, batch_size: int = 4,
                  on_tile: Callable[[int, int], None] | None = None) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields ((top, left, bottom, right), float32 logits [h, w, C]) of every output tile in
    raster order: the windows' logits averaged as ``Inference``'s slide mode averages them.

    Args:
      reader: ``TiffRegions`` or ``WholeImage`` (height, width, read).
      window_logits: uint8 windows [n, ch, cw, 3] -> float32 logits [n, ch, cw, C].
      crop_size, stride: the sliding windows, (height, width) each; the image is at least one
        window large.
      tile: the output tiles' edge.
      on_tile: called with (tiles done, tiles in all) after each tile.
    """
    from segtrain.inference import windows

    ch, cw = crop_size
    if reader.height < ch or reader.width < cw:
        raise SegtrainError(f"The image ({reader.width}x{reader.height}) is smaller than one window ({cw}x{ch}).")
    all_windows = windows(reader.height, reader.width, crop_size, stride)
    tops = sorted({w[0] for w in all_windows})
    lefts = sorted({w[1] for w in all_windows})
    tiles = tile_grid(reader.height, reader.width, tile)
    for done, (t, left, b, r) in enumerate(tiles, 1):
        total = np.zeros((b - t, r - left, num_classes), np.float32)
        count = np.zeros((b - t, r - left, 1), np.float32)
        todo = [(y, x) for y in _overlapping(tops, ch, t, b) for x in _overlapping(lefts, cw, left, r)]
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            logits = window_logits(np.stack([reader.read(y, x, y + ch, x + cw) for y, x in batch]))
            for (y, x), window in zip(batch, logits):
                ys, ye, xs, xe = max(y, t), min(y + ch, b), max(x, left), min(x + cw, r)
                total[ys - t:ye - t, xs - left:xe - left] += window[ys - y:ye - y, xs - x:xe - x]
                count[ys - t:ye - t, xs - left:xe - left] += 1.0
        if on_tile is not None:
            on_tile(done, len(tiles))
        yield (t, left, b, r), total / count


def write_tiled_mask(path: str, height: int, width: int, tile: int, tiles: Iterator[np.ndarray],
                     palette: np.ndarray) -> None:
    """Writes uint8 class ids, given as raster-order tiles [<=tile, <=tile], to a tiled, deflated
    BigTIFF whose colour map is ``palette`` ([256, 3] uint8), through a temporary file and a
    rename: viewers show the classes' colours, the values are the class ids."""
    tifffile = require_tifffile()
    colormap = (np.asarray(palette, np.uint16).T * 257).astype(np.uint16)  # 8 -> 16 bits per channel

    def padded():
        for values in tiles:
            out = np.zeros((tile, tile), np.uint8)
            out[:values.shape[0], :values.shape[1]] = values
            yield out

    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with tifffile.TiffWriter(temporary, bigtiff=True) as writer:
            writer.write(padded(), shape=(height, width), dtype=np.uint8, tile=(tile, tile),
                         photometric="palette", colormap=colormap, compression="zlib")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
