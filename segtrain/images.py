"""Images in and out of the commands that use a trained model: finding, reading, colouring, writing.

Images are read as uint8 RGB (grey and palette images are converted, an alpha channel is
dropped), or, for a model of other bands (multispectral, 16-bit), as stored (``read_bands``). Every file is written through a temporary file and a rename (segtrain.io), so an
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


def is_rgb(channels: int, dtype: str) -> bool:
    """Images of ``channels`` bands of ``dtype`` are 8-bit RGB photographs (else: bands read as stored)."""
    return (channels, dtype) == (3, "uint8")


def read_image(path: str, channels: int = 3, dtype: str = "uint8") -> np.ndarray:
    """An input image as a model of ``channels`` bands of ``dtype`` takes it: 8-bit RGB through
    ``read_rgb`` (grey and RGBA converted), any other layout through ``read_bands`` (as stored)."""
    if is_rgb(channels, dtype):
        return read_rgb(path)
    return read_bands(path, channels, 16 if dtype == "uint16" else 8)


BAND_DTYPES = {8: np.uint8, 16: np.uint16}
# PNG colour types (the IHDR chunk) -> samples per pixel; 3 is a palette image (one index).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def read_bands(path: str, channels: int, bit_depth: int = 8) -> np.ndarray:
    """The pixels of an image of ``channels`` bands of ``bit_depth`` bits as they are stored,
    uint8 or uint16 [H, W, channels]: nothing converted (multispectral, 16-bit, grey images).

    TIFF (tifffile, any number of bands, contiguous or planar: its first page), PNG (8 or 16
    bits, 1 to 4 samples), and 8-bit JPEG / BMP through Pillow.

    Raises:
      SegtrainError: the file does not read, or holds another number of bands or another
        depth; the message names the file and both.
    """
    dtype = BAND_DTYPES[bit_depth]
    extension = os.path.splitext(path)[1].lower()
    try:
        if extension in (".tif", ".tiff"):
            pixels = read_tiff_page(path)
        elif extension == ".png":
            with open(path, "rb") as f:
                data = f.read()
            if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 26:
                raise ValueError("not a PNG file")
            depth, samples = data[24], _PNG_SAMPLES.get(data[25], 0)
            if depth not in (8, 16) or data[25] == 3:
                raise ValueError(f"a PNG of {depth}-bit {'palette' if data[25] == 3 else 'samples'}, not 8 or 16 "
                                 f"bits per band")
            import tensorflow as tf

            pixels = tf.io.decode_png(data, channels=samples, dtype=tf.uint16 if depth == 16 else tf.uint8).numpy()
        else:
            with Image.open(path) as image:
                if deep_samples(image):
                    raise ValueError(deep_samples(image))
                pixels = np.array(image)
    except ImportError:
        raise SegtrainError(f"{path}: reading TIFF bands needs tifffile: pip install 'segtrain[tiff]'.") from None
    except Exception as e:  # each library raises its own errors for bad files
        raise SegtrainError(f"{path}: not a readable image ({e}).") from None
    if pixels.ndim == 2:
        pixels = pixels[..., np.newaxis]
    if pixels.ndim != 3 or pixels.shape[-1] != channels or pixels.dtype != dtype:
        bands = pixels.shape[-1] if pixels.ndim == 3 else "?"
        raise SegtrainError(f"{path}: an image of {bands} band(s) of {pixels.dtype}, but the dataset's images have "
                            f"{channels} band(s) of {np.dtype(dtype).name} ({bit_depth} bits).")
    return np.ascontiguousarray(pixels)


def read_tiff_page(path: str) -> np.ndarray:
    """The first page of a TIFF as stored, [H, W] or [H, W, bands] (planar bands moved last),
    through tifffile; ImportError without it, tifffile's own errors for a bad file."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        pixels = page.asarray()
        if pixels.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
            pixels = np.moveaxis(pixels, 0, -1)
    return pixels


EIGHT_BITS = ("segtrain reads images of 8-bit grey, RGB or RGBA pixels as RGB photographs: for images of "
              "other bands or 16 bits, read them as stored with a `folder` dataset's datasets.folder.channels "
              "(and bit_depth = 16), or convert them to 8-bit RGB with the scaling your data needs.")


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


def display(pixels: np.ndarray, mean=None, std=None, channels=None) -> np.ndarray:
    """uint8 RGB [H, W, 3] to look at, of stored pixels [H, W, C].

    8-bit RGB stays as it is. Other images show ``channels`` (three as RGB or one as grey;
    default: the first three, or the first), each stretched from mean - 2.5 std to mean + 2.5
    std of its channel (the dataset's statistics; without them, the image's own).
    """
    pixels = np.asarray(pixels)
    if channels is None and pixels.dtype == np.uint8 and pixels.shape[-1] == 3:
        return pixels
    picked = list(channels) if channels is not None else ([0, 1, 2] if pixels.shape[-1] >= 3 else [0])
    if len(picked) not in (1, 3) or max(picked) >= pixels.shape[-1] or min(picked) < 0:
        raise SegtrainError(f"overlay channels {picked}: name one or three of the image's {pixels.shape[-1]} "
                            f"channels (0-based), e.g. (3, 2, 1).")
    x = pixels[..., picked].astype(np.float64)
    m = np.asarray(mean, np.float64)[picked] if mean is not None else x.mean(axis=(0, 1))
    s = np.asarray(std, np.float64)[picked] if std is not None else x.std(axis=(0, 1))
    s = np.where(s > 0, s, 1.0)
    shown = np.clip((x - (m - 2.5 * s)) / (5.0 * s), 0.0, 1.0) * 255.0
    shown = np.round(shown).astype(np.uint8)
    return np.repeat(shown, 3, axis=-1) if shown.shape[-1] == 1 else shown


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
