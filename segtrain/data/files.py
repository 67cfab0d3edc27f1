"""What every file-based dataset plugin does: read the prepared copy, or the raw files.

    datasets.voc2012.data_dir = '/data/prepared'     # written by `segtrain prepare` (fast)
    datasets.voc2012.source_dir = '/data/VOCdevkit'  # the raw files (no preparation, slower)

A file dataset is one ``Source`` subclass decorated with ``@file_dataset``: that registers the
dataset plugin, whose settings are the Source's arguments, and makes it preparable.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os

import numpy as np
import tensorflow as tf

from registry import DATASETS
from segtrain.data.info import DatasetInfo
from segtrain.data.prepare import load_prepared
from segtrain.data.raw import BadExample, Source, check_label_size, problems_message
from segtrain.errors import DATA_ERROR_MARKER, SegtrainError, warn
from segtrain.images import EIGHT_BITS, deep_samples, read_rgb

_warned_raw: set[str] = set()


def file_dataset(source_cls: type[Source]) -> type[Source]:
    """Class decorator: registers a file-based dataset once, for reading and for `segtrain prepare`.

    The registered dataset plugin is ``name(split, data_dir=None, source_dir=None,
    skip_damaged_records=False, **settings)``, where the settings are the arguments of
    ``source_cls`` (gin: ``datasets.<name>.*``). It keeps ``source_cls`` as its ``source``
    attribute: `segtrain prepare` builds the Source from the same settings.
    ``skip_damaged_records`` reads a prepared copy around damaged shards (segtrain.data.verify).
    """
    settings = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                for p in list(inspect.signature(source_cls.__init__).parameters.values())[1:]
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    Param = inspect.Parameter

    def read(split: str = source_cls.splits[0], data_dir: str | None = None, source_dir: str | None = None,
             skip_damaged_records: bool = False, **kwargs) -> tuple[tf.data.Dataset, DatasetInfo]:
        return load(source_cls(**kwargs), split, data_dir, source_dir, skip_damaged_records)

    read.__signature__ = inspect.Signature([
        Param("split", Param.POSITIONAL_OR_KEYWORD, default=source_cls.splits[0]),
        Param("data_dir", Param.KEYWORD_ONLY, default=None),
        Param("source_dir", Param.KEYWORD_ONLY, default=None),
        Param("skip_damaged_records", Param.KEYWORD_ONLY, default=False),
        *settings,
    ])
    read.__name__ = read.__qualname__ = source_cls.name
    read.__module__ = source_cls.__module__
    read.__doc__ = source_cls.__doc__
    read.source = source_cls
    DATASETS.register(source_cls.name)(read)
    return source_cls


def preparable(fn) -> type[Source] | None:
    """The Source class of a registered dataset function, if it reads files (see file_dataset)."""
    return getattr(fn, "source", None)


def load(source: Source, split: str, data_dir: str | None, source_dir: str | None,
         skip_damaged_records: bool = False) -> tuple[tf.data.Dataset, DatasetInfo]:
    """The dataset-plugin contract for a file-based ``source``.

    Args:
      source: the layout, with its settings.
      split: the split to read.
      data_dir: the directory ``segtrain prepare`` wrote (preferred).
      source_dir: the raw files, read directly when ``data_dir`` is not set.
      skip_damaged_records: read a prepared copy around its damaged shards, counted.

    Returns:
      (encoded examples, DatasetInfo with ``decode``), as the pipeline expects.
    """
    source.check_split_name(split)
    if data_dir:
        ds, info = load_prepared(source, split, data_dir, skip_damaged_records)
    elif source_dir:
        ds, info = load_raw(source, split, source_dir)
    else:
        raise SegtrainError(
            f"Dataset '{source.name}' needs its files: set datasets.{source.name}.data_dir to the directory "
            f"`segtrain prepare --dataset={source.name}` wrote (fast), or datasets.{source.name}.source_dir "
            f"to the raw files (slower). {source.layout}"
        )
    info, fn = source.read_time_labels(info)
    if fn is not None:
        decode, decode_region = info.decode, info.decode_region

        def mapped(example, decode=decode):
            example = decode(example)
            return {**example, "label": fn(example["label"])}

        def mapped_region(example, choose, decode_region=decode_region):
            example = decode_region(example, choose)
            return {**example, "label": fn(example["label"])}

        info = dataclasses.replace(info, decode=mapped,
                                   decode_region=mapped_region if decode_region else None)
    return ds, info


def load_raw(source: Source, split: str, source_dir: str) -> tuple[tf.data.Dataset, DatasetInfo]:
    """Reads the raw files of ``split``: images decoded by TF, labels mapped in Python."""
    examples, problems = source.list_split(os.path.abspath(os.path.expanduser(source_dir)), split)
    if problems:
        raise SegtrainError(problems_message(
            problems, f"{source.name} split '{split}' in {source_dir}",
            f"Fix these files, or prepare the dataset with `segtrain prepare --dataset={source.name} "
            "--skip_bad_examples` and read the prepared copy.",
        ))
    if not examples:
        raise SegtrainError(f"Split '{split}' of dataset '{source.name}' in {source_dir} is empty.")
    if source.name not in _warned_raw:
        _warned_raw.add(source.name)
        warn(
            f"Reading {source.name} from its raw files in {source_dir}: labels are decoded in Python, which "
            f"is slower than a prepared dataset and only checked as they are read. For real training run "
            f"`segtrain prepare --dataset={source.name} --source_dir={source_dir} --data_dir=DIR` and set "
            f"datasets.{source.name}.data_dir instead."
        )
    info = DatasetInfo(
        num_classes=source.num_classes,
        ignore_label=source.ignore_label,
        class_names=source.class_names,
        palette=source.palette,
        num_examples={split: len(examples)},
        name=source.name,
        multilabel=source.multilabel,
        **({"channels": source.channels, "image_dtype": source.image_dtype} if source.bands else {}),
        decode=functools.partial(decode_raw, source, tf_decodes=all(
            os.path.splitext(e.image)[1].lower() in TF_IMAGE_EXTENSIONS for e in examples)),
    )
    ds = tf.data.Dataset.from_tensor_slices({
        "image": [e.image for e in examples],
        "label": [e.label for e in examples],
        "key": [e.key for e in examples],
    })
    return ds, info


TF_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # what tf.io.decode_image reads


def decode_raw(source: Source, example: dict, tf_decodes: bool = True) -> dict:
    """{'image': path, 'label': path} -> decoded example, checked; errors name the file.

    ``tf_decodes``: TF decodes every image of the split; otherwise (TIFF, say) Pillow does.
    A bands source's images are read as stored (``Source.read_image``).
    """
    if source.bands:
        def read_both(image_path: bytes, label_path: bytes):
            image_path, label_path = image_path.decode(), label_path.decode()
            try:
                image = source.read_image(image_path)
            except BadExample as e:
                raise ValueError(f"{DATA_ERROR_MARKER}{image_path}: {e}") from None
            try:
                label = source.read_label(label_path)
                check_label_size(label, image.shape[0], image.shape[1], image_path)
            except BadExample as e:
                raise ValueError(f"{DATA_ERROR_MARKER}{label_path}: {e}") from None
            return image, label

        image, label = tf.numpy_function(read_both, [example["image"], example["label"]],
                                         [tf.dtypes.as_dtype(source.image_dtype), tf.uint8], stateful=False)
        return {"image": tf.ensure_shape(image, [None, None, source.channels]),
                "label": tf.ensure_shape(label, [None, None]), "key": example["key"]}

    def read_label(image_path: bytes, label_path: bytes) -> np.ndarray:
        from PIL import Image

        image_path, label_path = image_path.decode(), label_path.decode()
        try:
            label = source.read_label(label_path)
            try:
                with Image.open(image_path) as image:  # the header only: TF decodes the pixels
                    width, height = image.size
                    deep = deep_samples(image)
            except Exception as e:
                raise BadExample(f"corrupt image {image_path} ({e})") from None
            if deep:  # decoding would convert it to 8 bits silently, as prepare refuses to
                raise BadExample(f"image {image_path} is {deep}; {EIGHT_BITS}")
            check_label_size(label, height, width, image_path)
        except BadExample as e:
            raise ValueError(f"{DATA_ERROR_MARKER}{label_path}: {e}") from None
        return label

    label = tf.numpy_function(read_label, [example["image"], example["label"]], tf.uint8, stateful=False)
    label = tf.ensure_shape(label, [None, None])
    if tf_decodes:
        image = tf.io.decode_image(tf.io.read_file(example["image"]), channels=3, expand_animations=False)
    else:
        image = tf.ensure_shape(tf.numpy_function(_pillow_rgb, [example["image"]], tf.uint8, stateful=False),
                                [None, None, 3])
    return {"image": image, "label": label, "key": example["key"]}


def _pillow_rgb(path: bytes) -> np.ndarray:
    try:
        return read_rgb(path.decode())
    except SegtrainError as e:  # names the file
        raise ValueError(f"{DATA_ERROR_MARKER}{e}") from None


def damaged_data(fn, splits, settings: dict) -> str | None:
    """For dataset plugin ``fn`` read from its prepared copy (``settings``: its gin bindings,
    data_dir among them): the damaged shards of ``splits`` as one message, or None.

    Called when reading failed with a damaged or missing record file: TensorFlow names only a
    byte offset, so the split's shards are read (records only, nothing decoded) to name the file.
    """
    from segtrain.data import verify
    from segtrain.data.prepare import builder_class, prepared_dir

    source_cls, data_dir = preparable(fn), settings.get("data_dir")
    if source_cls is None or not data_dir:
        return None
    builder = builder_class(source_cls.name, source_cls.version)(data_dir=os.path.expanduser(data_dir))
    present = [s for s in dict.fromkeys(splits) if s in builder.info.splits]
    damages = verify.verify(builder, present)
    if not damages:
        return None
    return verify.damage_message(source_cls.name, prepared_dir(data_dir, source_cls), data_dir, damages)
