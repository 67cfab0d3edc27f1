"""Reading datasets in their own on-disk layouts: listing, label mapping and checking.

A ``Source`` knows one layout (a VOCdevkit tree, the Oxford-IIIT Pet folders, Cityscapes, a
pair of folders): which splits it has, which image goes with which label file, and how a
label file's values become class ids. ``segtrain prepare`` checks every example with it and
writes a tensorflow-datasets dataset; a dataset plugin can also read the raw files directly.

This module needs NumPy and Pillow only, so the worker processes of ``segtrain prepare`` start
quickly.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from segtrain.errors import SegtrainError
from segtrain.images import EIGHT_BITS, deep_samples, is_rgb, read_bands, read_tiff_page, tiff_layout

# Bytes of these formats are stored as they are; other formats are re-encoded as PNG.
_KEPT_FORMATS = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "L", "P", "RGBA", "LA")}
INVALID = -1  # a raw label value that maps to no class and is not the ignore label
MAX_LISTED = 10  # offending files named in a message; the rest are counted


@dataclasses.dataclass(frozen=True)
class Example:
    """One image and its label file. ``key`` is unique within the dataset (a file stem)."""

    key: str
    image: str
    label: str


class BadExample(Exception):
    """One example cannot be used: ``str(e)`` says why, ``e.path`` is the offending file."""

    def __init__(self, reason: str, path: str | None = None):
        super().__init__(reason)
        self.path = path


@dataclasses.dataclass(frozen=True)
class Problem:
    """A file that cannot be used, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def problems_message(problems: Sequence[Problem], what: str, hint: str) -> str:
    """One message naming the first few offending files and counting the rest."""
    lines = [f"{what}: {len(problems)} bad example(s):"]
    lines += [f"  {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    lines.append(hint)
    return "\n".join(lines)


class Source:
    """A dataset layout on disk. Subclasses set the class attributes and ``list_split``.

    A subclass decorated with ``segtrain.data.files.file_dataset`` is a registered dataset: its
    ``__init__`` arguments are the dataset's settings (gin: ``datasets.<name>.*``), for reading
    and for preparing alike.

    Attributes:
      name: the registry name of the dataset.
      version: version of the prepared dataset; bump it when the stored data would change.
      splits: the split names the layout has (the first is the default split).
      class_names, palette, ignore_label: class information of the stored labels.
      multilabel: the labels are multi-label bits (segtrain.task), class_names the labels.
      channels, bit_depth: images of ``channels`` bands of 8 or 16 bits, read as they are
        stored (``segtrain.images.read_bands``); None: RGB photographs (grey and RGBA converted).
    """

    name: str = ""
    version: str = "1.0.0"
    splits: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    ignore_label: int = 255
    multilabel: bool = False
    channels: int | None = None
    bit_depth: int = 8
    ignore_colour: tuple[int, int, int] | None = None  # RGB masks: the colour of the ignore label
    layout: str = ""  # where the files go, for messages and the datasets page

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_dtype(self) -> str:
        """'uint8' or 'uint16': the sample type of ``bit_depth``."""
        return f"uint{self.bit_depth}"

    @property
    def bands(self) -> bool:
        """The images are read as stored bands (not 8-bit RGB)."""
        return self.channels is not None and not is_rgb(self.channels, self.image_dtype)

    def read_image(self, path: str) -> np.ndarray:
        """A bands image's pixels, [H, W, channels] uint8 or uint16; BadExample if it does not fit."""
        try:
            return read_bands(path, self.channels, self.bit_depth)
        except SegtrainError as e:
            raise BadExample(str(e).removeprefix(f"{path}: ")) from None

    def list_split(self, source_dir: str, split: str) -> tuple[list[Example], list[Problem]]:
        """The examples of ``split`` and the files that have no partner (image or label)."""
        raise NotImplementedError

    def label_lut(self) -> np.ndarray | None:
        """[256] int16 table from raw label values to class ids (INVALID for bad values), or None."""
        return None

    def read_label(self, path: str) -> np.ndarray:
        """The label file as class ids (uint8 [H, W]); raises BadExample for bad content."""
        return self.to_class_ids(self.raw_label(path))

    def raw_label(self, path: str) -> np.ndarray:
        """The label file's values before any mapping (subclasses read other file types here)."""
        with _open(path, "label") as image:
            return label_values(image, self.palette, self.ignore_label, self.ignore_colour)

    def to_class_ids(self, values: np.ndarray) -> np.ndarray:
        """Raw label values -> class ids through ``label_lut``; BadExample for values outside the classes."""
        lut = self.label_lut()
        if lut is not None:
            mapped = lut[values]
            if (mapped == INVALID).any():
                bad = np.unique(values[mapped == INVALID])
                raise BadExample(f"label values {_list(bad)} are not {self.valid_raw_values()}")
            values = mapped
        limit = 2 ** self.num_classes if self.multilabel else self.num_classes
        bad = np.unique(values[(values >= limit) & (values != self.ignore_label)])
        if bad.size:
            what = (f"combinations of the {self.num_classes} labels' bits 0..{limit - 1}" if self.multilabel
                    else f"class ids 0..{self.num_classes - 1}")
            raise BadExample(f"label values {_list(bad)} are neither {what} nor the ignore label {self.ignore_label}")
        return values.astype(np.uint8)

    def valid_raw_values(self) -> str:
        return "valid label values"

    def read_time_labels(self, info):
        """A change of the classes made when reading, not when preparing (one prepared copy
        serves every setting): (new DatasetInfo, TF function on uint8 labels) or (info, None)."""
        return info, None

    # -- helpers for subclasses

    def root(self, source_dir: str, must_have: Sequence[str], candidates: Sequence[str] = ("",)) -> str:
        """The first of source_dir/<candidate> holding every ``must_have`` entry."""
        source_dir = os.path.expanduser(source_dir)
        if not os.path.isdir(source_dir):
            raise SegtrainError(f"{self.name}: source directory {source_dir} does not exist. {self.layout}")
        for candidate in candidates:
            path = os.path.join(source_dir, candidate)
            if all(os.path.exists(os.path.join(path, m)) for m in must_have):
                return path
        looked = ", ".join(os.path.join(source_dir, c, m) for c in candidates for m in must_have)
        raise SegtrainError(f"{self.name}: {source_dir} is not the expected layout (looked for {looked}). {self.layout}")

    def split_list(self, path: str, split: str) -> list[str]:
        """The ids of a split list file (first word of each non-empty line)."""
        if not os.path.isfile(path):
            raise SegtrainError(f"{self.name}: split list {path} for split '{split}' does not exist. {self.layout}")
        with open(path) as f:
            ids = [line.split()[0] for line in f if line.strip() and not line.startswith("#")]
        if not ids:
            raise SegtrainError(f"{self.name}: split '{split}' is empty ({path} lists no examples).")
        return ids

    def split_dirs(self, split: str, *directories: str) -> tuple[str, ...]:
        """``directories`` (one split's folders), each checked to exist."""
        for d in directories:
            if not os.path.isdir(d):
                raise SegtrainError(f"{self.name}: directory {d} for split '{split}' does not exist. {self.layout}")
        return directories

    def check_split_name(self, split: str) -> None:
        if split not in self.splits:
            raise SegtrainError(f"Dataset '{self.name}' has no split {split!r}; use one of {', '.join(self.splits)}.")


def pair_by_stem(images: dict[str, str], labels: dict[str, str]) -> tuple[list[Example], list[Problem]]:
    """Examples for stems present in both maps; problems for the others."""
    examples = [Example(k, images[k], labels[k]) for k in sorted(images) if k in labels]
    problems = [Problem(images[k], "no label file for this image") for k in sorted(images) if k not in labels]
    problems += [Problem(labels[k], "no image for this label file") for k in sorted(labels) if k not in images]
    return examples, problems


def files_by_stem(directory: str, extension: str) -> dict[str, str]:
    """{file stem: path} of the ``extension`` files directly in ``directory``."""
    return {os.path.basename(p)[: -len(extension)]: p for p in glob.glob(os.path.join(directory, "*" + extension))}


def pair_listed(ids: Iterable[str], image_path, label_path) -> tuple[list[Example], list[Problem]]:
    """Examples for listed ids whose image and label files both exist; problems for the others."""
    examples, problems = [], []
    for key in ids:
        image, label = image_path(key), label_path(key)
        has_image, has_label = os.path.isfile(image), os.path.isfile(label)
        if has_image and has_label:
            examples.append(Example(key, image, label))
        elif has_image:
            problems.append(Problem(image, f"no label file {label}"))
        elif has_label:
            problems.append(Problem(label, f"no image {image}"))
        else:
            problems.append(Problem(image, f"listed, but neither the image nor {label} exists"))
    return examples, problems


class _open:  # noqa: N801 (a context manager)
    """Opens and fully decodes an image file; BadExample if it is corrupt or truncated."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what

    def __enter__(self) -> Image.Image:
        try:
            self.image = Image.open(self.path)
            deep = self.what == "image" and deep_samples(self.image)
            if deep:
                self.image.close()
                raise BadExample(f"{deep}; {EIGHT_BITS}")
            self.image.load()
        except BadExample:
            raise
        except FileNotFoundError:
            raise BadExample(f"{self.what} file is missing") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            other = tiff_layout(self.path) if self.what == "image" else None
            if other:
                raise BadExample(f"{other}; {EIGHT_BITS}") from None
            raise BadExample(f"corrupt or truncated {self.what} file ({e})") from None
        return self.image

    def __exit__(self, *exc):
        self.image.close()
        return False


def label_values(image: Image.Image, palette: Sequence[Sequence[int]], ignore_label: int,
                 ignore_colour: Sequence[int] | None = None) -> np.ndarray:
    """Raw label values of a label image: palette indices, grey values, or, for an RGB mask,
    class ids looked up in ``palette``."""
    if image.mode in ("P", "L"):
        return np.asarray(image, np.uint8)
    if image.mode in ("I", "I;16", "I;16B"):
        values = np.asarray(image)
        if values.max(initial=0) > 255:
            raise BadExample(f"label values up to {values.max()} do not fit in 8 bits")
        return values.astype(np.uint8)
    if image.mode in ("RGB", "RGBA"):
        return colours_to_ids(np.asarray(image.convert("RGB")), palette, ignore_label, ignore_colour)
    raise BadExample(f"label image mode {image.mode} is not a class-index or RGB image")


def read_mask_channels(path: str) -> np.ndarray:
    """A multi-label mask file's channels, [H, W, C] (grey: C = 1); BadExample if it does not read.

    PNG and BMP through Pillow; a TIFF's first page through tifffile (``segtrain[tiff]``; any
    number of bands, contiguous or planar), or through Pillow without it.
    """
    values = None
    if os.path.splitext(path)[1].lower() in (".tif", ".tiff"):
        try:
            values = read_tiff_page(path)
        except ImportError:
            pass  # Pillow reads it below
        except FileNotFoundError:
            raise BadExample("label file is missing") from None
        except Exception as e:
            raise BadExample(f"corrupt or truncated label file ({e})") from None
    if values is None:
        with _open(path, "label") as image:
            values = np.asarray(image.convert("L") if image.mode == "1" else image)
    return values[..., np.newaxis] if values.ndim == 2 else values


def colours_to_ids(rgb: np.ndarray, palette: Sequence[Sequence[int]], ignore_label: int,
                   ignore_colour: Sequence[int] | None = None) -> np.ndarray:
    """Maps an RGB mask [H, W, 3] to class ids through ``palette``; BadExample for other colours."""
    if not palette:
        raise BadExample("the label is an RGB colour mask, but the dataset has no palette to map colours to classes")
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(palette)}
    if ignore_colour is not None:
        r, g, b = ignore_colour
        table[(r << 16) | (g << 8) | b] = ignore_label
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [u for u in unique.tolist() if u not in table]
    if unknown:
        shown = ", ".join(f"({u >> 16}, {(u >> 8) & 255}, {u & 255})" for u in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise BadExample(f"mask colours {shown}{more} are not in the palette")
    ids = np.asarray([table[u] for u in unique.tolist()], np.uint8)
    return ids[inverse.reshape(codes.shape)]


def encode_png(values: np.ndarray) -> bytes:
    """A single-channel 8-bit PNG of ``values``."""
    buffer = io.BytesIO()
    Image.fromarray(values, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def image_bytes(path: str) -> tuple[bytes, tuple[int, int]]:
    """The image file's bytes (re-encoded as PNG if TF could not decode them as they are) and
    its (height, width); BadExample if the file is corrupt or truncated."""
    with _open(path, "image") as image:
        size = (image.height, image.width)
        if image.mode in _KEPT_FORMATS.get(image.format or "", ()):
            with open(path, "rb") as f:
                return f.read(), size
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue(), size


def load_example(source: Source, example: Example) -> tuple[bytes | np.ndarray, bytes]:
    """(image bytes, or a bands image's pixels; label PNG bytes) of a good example; BadExample
    names what is wrong."""
    try:
        if source.bands:
            data = source.read_image(example.image)
            height, width = data.shape[:2]
        else:
            data, (height, width) = image_bytes(example.image)
    except BadExample as e:
        raise BadExample(str(e), example.image) from None
    try:
        label = source.read_label(example.label)
        check_label_size(label, height, width, example.image)
    except BadExample as e:
        raise BadExample(str(e), example.label) from None
    return data, encode_png(label)


def check_label_size(label: np.ndarray, height: int, width: int, image_path: str) -> None:
    """BadExample unless the label is as large as its image."""
    if label.shape != (height, width):
        raise BadExample(
            f"label is {label.shape[1]}x{label.shape[0]} (width x height) but its image "
            f"{os.path.basename(image_path)} is {width}x{height}"
        )


def check_example(source: Source, example: Example):
    """For worker processes: ('ok', key, image bytes, label bytes) or ('bad', Problem)."""
    try:
        image, label = load_example(source, example)
        return ("ok", example.key, image, label)
    except BadExample as e:
        return ("bad", Problem(e.path or example.image, str(e)))


def _list(values) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:8])) + (f" (and {len(values) - 8} more)" if len(values) > 8 else "")
