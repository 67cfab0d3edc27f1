"""Images in and out of the commands that use a trained model: finding, reading, colouring, writing.

Every image is read as uint8 RGB (grey and palette images are converted, an alpha channel is
dropped). Every file is written through a temporary file and a rename (segtrain.io), so an
output directory never holds half an image.
"""

from __future__ import annotations

import glob
import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

from segtrain.errors import SegtrainError
from segtrain.io import atomic_write_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_inputs(spec: str | Sequence[str]) -> list[str]:
    """The image files named by ``spec``: files, directories (their images, sorted, not recursive)
    and glob patterns, comma-separated or as a list. Order is kept, duplicates dropped.

    Raises:
      SegtrainError: a part names nothing, or nothing is found at all.
    """
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not parts:
        raise SegtrainError("--input is required: image files, a directory or a glob such as 'photos/*.jpg'.")
    found: list[str] = []
    for part in parts:
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            matches = sorted(os.path.join(part, n) for n in os.listdir(part)
                             if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(part, n)))
            if not matches:
                raise SegtrainError(f"--input={part}: the directory holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
        elif os.path.isfile(part):
            matches = [part]
        elif glob.has_magic(part):
            matches = sorted(p for p in glob.glob(part) if os.path.isfile(p))
            if not matches:
                raise SegtrainError(f"--input={part}: the pattern matches no file.")
        else:
            raise SegtrainError(f"--input={part}: no such file or directory.")
        found.extend(matches)
    return list(dict.fromkeys(found))


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H,W,3] RGB pixels of an image file (grey, palette and RGBA converted).

    Raises:
      SegtrainError: the file cannot be read as an image; the message names it.
    """
    try:
        with Image.open(path) as im:
            deep = deep_samples(im)
            if not deep:
                im.load()
                if im.mode == "RGBA" or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA")
                return np.array(im.convert("RGB"), np.uint8)  # a writable copy: C libraries may need one
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        other = tiff_layout(path)
        if other:
            raise SegtrainError(f"{path}: {other}; {EIGHT_BITS}") from None
        raise SegtrainError(f"{path}: not a readable image ({e}).") from None
    raise SegtrainError(f"{path}: {deep}; {EIGHT_BITS}")


EIGHT_BITS = ("segtrain reads images of 8-bit grey, RGB or RGBA pixels: convert it to 8 bits per sample "
              "and at most 3 colour bands, with the scaling your data needs.")


def deep_samples(image: Image.Image) -> str | None:
    """What an opened image holds beyond 8 bits per sample, or None. Pillow would convert such
    pixels to 8 bits silently: 16-bit grey clipped at 255, 16-bit RGB cut to its high byte."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return f"a {image.mode} image (more than 8 bits per sample)"
    raw = image.tile[0][3] if image.tile else None
    raw = raw[0] if isinstance(raw, tuple) and raw else raw
    if isinstance(raw, str) and (";16" in raw or ";32" in raw):
        return f"a {raw} image (16 bits per sample)"
    return None


def tiff_layout(path: str) -> str | None:
    """For a TIFF Pillow cannot open (more than 4 bands, say): its bands and sample type as
    tifffile reads them, or None (not a TIFF, or tifffile not installed)."""
    if not path.lower().endswith((".tif", ".tiff")):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return f"a TIFF of {page.samplesperpixel} band(s) of {page.dtype}"
    except Exception:
        return None


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3]: each label's colour from a [256,3] table (DatasetInfo.palette_array())."""
    return np.asarray(palette, np.uint8)[np.asarray(labels, np.int64).clip(0, 255)]


def blend(image: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``alpha`` of ``colour`` over ``image`` (both uint8 [H,W,3])."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    """The bytes of ``pixels`` (uint8 [H,W] or [H,W,3]; uint16/int32 [H,W] as 16-bit PNG) as PNG or JPEG."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2 and pixels.dtype != np.uint8:
        if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 65535:
            raise ValueError("a 16-bit PNG holds values 0..65535")
        image = Image.fromarray(pixels.astype(np.uint16))
    else:
        image = Image.fromarray(pixels.astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def write_image(path: str, pixels: np.ndarray, **options) -> None:
    """Writes ``pixels`` to ``path`` atomically, as PNG or JPEG by the file's extension."""
    fmt = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
    if fmt == "JPEG":
        options.setdefault("quality", 90)
    atomic_write_bytes(path, encode(pixels, fmt, **options))
