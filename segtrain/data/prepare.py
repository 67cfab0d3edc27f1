"""``segtrain prepare``: check a raw dataset once and store it as a tensorflow-datasets dataset.

The dataset is built by a tfds ``GeneratorBasedBuilder`` that reads the user's local files
(``manual_dir`` style: nothing is downloaded). Images keep their original JPEG/PNG bytes; labels
are stored as single-channel class-index PNGs; the metadata holds the class names, palette and
ignore label, and per split the pixels of each class (``class_pixel_counts``) and the labelled
pixels of the images each class appears in (``class_image_pixels``), from which losses derive
class weights; tfds records the split sizes. tfds writes into a temporary directory
(``<data_dir>/<name>/incomplete.<random>_<version>/``) and renames it when every split is
written, so an interrupted run leaves nothing that a later run would take as a prepared dataset.
A run killed outright leaves that temporary directory behind; the next run removes it, and says
so (`segtrain prepare` holds the lock of ``<data_dir>/<name>``, so it is no other job's).

Layout: ``<data_dir>/<dataset name>/<version>/`` (tfds' own files), plus
``skipped_examples.txt`` there when ``--skip_bad_examples`` skipped some.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence, TextIO

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from segtrain.data import verify
from segtrain.data.info import DatasetInfo
from segtrain.data.raw import Example, Problem, Source, check_example, problems_message
from segtrain.errors import SegtrainError, warn
from segtrain.io import atomic_write_text
from segtrain.progress import Progress
from segtrain.task import unpack_np

SKIPPED_FILE = "skipped_examples.txt"


@functools.cache
def builder_class(name: str, version: str, bands: tuple[int, str] | None = None) -> type:
    """The tfds builder class of a segtrain dataset (one per name, version and image layout).

    ``bands``: (channels, 'uint8' | 'uint16') of images stored as they are read (not 8-bit RGB),
    as a zlib-compressed tensor; None: RGB images as their JPEG or PNG bytes.
    """
    image_feature = (tfds.features.Image(shape=(None, None, 3)) if bands is None else
                     tfds.features.Tensor(shape=(None, None, bands[0]), dtype=np.dtype(bands[1]),
                                          encoding=tfds.features.Encoding.ZLIB))

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        RELEASE_NOTES = {version: "Prepared by segtrain."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Run `segtrain prepare --dataset=NAME --source_dir=RAW --data_dir=OUT`."

        # Set by prepare() before download_and_prepare(); unused when reading.
        job: "_Job | None" = None
        # tfds looks for a checksums file next to a builder's code; these builders download
        # nothing. (Its code-path lookup also needs the importlib_resources backport.)
        code_path = None

        def _info(self) -> tfds.core.DatasetInfo:
            metadata = tfds.core.MetadataDict(self.job.metadata if self.job else {})
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"segtrain's prepared copy of the {name} segmentation dataset.",
                features=tfds.features.FeaturesDict({
                    "image": image_feature,
                    "label": tfds.features.Image(shape=(None, None, 1), use_colormap=False, encoding_format="png"),
                    "key": tfds.features.Text(),
                }),
                metadata=metadata,
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in self.job.examples}

        def _generate_examples(self, split):
            yield from self.job.generate(split)
            # tfds writes the metadata after the last split: the pixel counts are complete then.
            self.info.metadata.update(self.job.metadata)
            if len(self.job.written) == len(self.job.examples) and self.job.problems:
                # Into the temporary directory (data_dir while tfds writes), renamed with the rest.
                atomic_write_text(os.path.join(self.data_dir, SKIPPED_FILE),
                                  "".join(f"{p}\n" for p in self.job.problems))

    Builder.name = name
    Builder.__qualname__ = Builder.__name__ = f"Segtrain_{name}"
    return Builder


@dataclasses.dataclass
class _Job:
    """One `prepare` run: the examples per split, and what happened to them."""

    source: Source
    examples: dict[str, list[Example]]
    num_workers: int
    skip_bad_examples: bool
    stream: TextIO
    source_dir: str
    problems: list[Problem] = dataclasses.field(default_factory=list)
    written: dict[str, int] = dataclasses.field(default_factory=dict)
    # Per split, [256] counts of each label value, and of the labelled pixels of the images
    # each value appears in (filled by generate).
    pixel_counts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    image_pixels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # Bands images: per split, [3, channels] sums of 1, x and x^2 over the pixels (float64).
    band_sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    pool: concurrent.futures.Executor | None = None

    @property
    def metadata(self) -> dict:
        s = self.source
        n = s.num_classes
        return {"num_classes": n, "class_names": list(s.class_names),
                "palette": [list(c) for c in s.palette], "ignore_label": s.ignore_label,
                **({"multilabel": True} if s.multilabel else {}),
                **(_band_metadata(s, self.band_sums) if s.bands else {}),
                "class_pixel_counts": {k: v.tolist() for k, v in self.pixel_counts.items()},
                "class_image_pixels": {k: v.tolist() for k, v in self.image_pixels.items()}}

    def generate(self, split: str):
        examples = self.examples[split]
        check = functools.partial(check_and_count, self.source)
        written = 0
        progress = None
        n = self.source.num_classes
        counts = self.pixel_counts[split] = np.zeros(n, np.int64)
        image_pixels = self.image_pixels[split] = np.zeros(n, np.int64)
        # [256, n]: the classes (multi-label: the labels) each label value holds.
        holds = (unpack_np(np.arange(256), n) if self.source.multilabel else np.eye(256, n, dtype=np.uint8))
        holds[self.source.ignore_label] = 0
        bands = self.band_sums[split] = np.zeros((3, self.source.channels or 3), np.float64)
        for done, result in enumerate(self._map(check, examples), 1):
            if progress is None:  # timed from the first result: worker start-up is not a rate
                progress = Progress(f"prepare {split}", len(examples), unit="image", stream=self.stream, start=1)
            if result[0] == "ok":
                _, key, image, label, values, sums = result
                if sums is not None:
                    bands += sums
                written += 1
                per_class = values @ holds
                counts += per_class
                labelled = values.sum() - values[self.source.ignore_label]
                image_pixels += np.where(per_class > 0, labelled, 0)
                yield key, {"image": image, "label": label, "key": key}
            else:
                self.problems.append(result[1])
            after_example(split, done)
            elapsed = time.perf_counter() - progress.t0
            progress.update(done, items_per_s=(done - 1) / elapsed if done > 1 else None)
        self.written[split] = written
        if written == 0:
            raise SegtrainError(
                f"{self.source.name}: every example of split '{split}' is bad; nothing to write.\n"
                + problems_message(self.problems, self.source.name, "")
            )
        if len(self.written) == len(self.examples) and self.problems and not self.skip_bad_examples:
            raise SegtrainError(problems_message(
                self.problems, f"{self.source.name} in {self.source_dir}",
                "Fix or remove these files, or run again with --skip_bad_examples to leave them out. "
                "Nothing was written.",
            ))

    def _map(self, fn, examples):
        if self.num_workers <= 1:
            return map(fn, examples)
        if self.pool is None:
            # spawn, not fork: the parent runs TensorFlow's threads, which a forked child must not
            # inherit. The workers only decode with Pillow; one pool serves every split.
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=exit_with_parent, initargs=(os.getpid(),))
        chunk = max(1, min(16, len(examples) // (4 * self.num_workers)))
        return self.pool.map(fn, examples, chunksize=chunk)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def after_example(split: str, done: int) -> None:
    """Called after each example prepare writes or skips (nothing here; where the fault tests
    interrupt or kill a run)."""


def exit_with_parent(parent: int) -> None:
    """Ends this worker process soon after ``parent`` is gone.

    A worker holds its own copy of the pool's task pipe, so it never sees the pipe close when
    the parent is killed (SIGKILL, the OOM killer): without this it would wait forever.
    """
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def check_and_count(source: Source, example: Example):
    """``check_example``, with the [256] pixel count of each label value of a good example
    appended (counted in the worker, so the parent only sums)."""
    result = check_example(source, example)
    if result[0] != "ok":
        return result
    with Image.open(io.BytesIO(result[3])) as png:  # the class-index PNG just encoded
        label = np.asarray(png, np.uint8)
    sums = None
    if source.bands:  # the image's bands: pixels, sum and sum of squares of each
        x = result[2].reshape(-1, result[2].shape[-1]).astype(np.float64)
        sums = np.stack([np.full(x.shape[1], x.shape[0], np.float64), x.sum(0), np.square(x).sum(0)])
    return (*result, np.bincount(label.ravel(), minlength=256).astype(np.int64), sums)


def _band_metadata(source: Source, band_sums: dict[str, np.ndarray]) -> dict:
    """The metadata of a bands dataset: its layout, and each split's mean and std per band."""
    mean = {k: (v[1] / np.maximum(v[0], 1)) for k, v in band_sums.items()}
    std = {k: np.sqrt(np.maximum(v[2] / np.maximum(v[0], 1) - mean[k] ** 2, 0.0)) for k, v in band_sums.items()}
    return {"channels": int(source.channels), "image_dtype": source.image_dtype,
            "channel_mean": {k: v.tolist() for k, v in mean.items()},
            "channel_std": {k: v.tolist() for k, v in std.items()}}


def bands_layout(source: Source) -> tuple[int, str] | None:
    """``builder_class``'s ``bands`` of a source: how its prepared images are stored."""
    return (int(source.channels), source.image_dtype) if source.bands else None


def prepared_dir(data_dir: str, source: Source) -> str:
    """Where the prepared copy of ``source`` lives under ``data_dir``."""
    return os.path.join(os.path.expanduser(data_dir), source.name, source.version)


def is_prepared(data_dir: str, source: Source) -> bool:
    return os.path.isfile(os.path.join(prepared_dir(data_dir, source), "dataset_info.json"))


def unfinished(data_dir: str, source: Source) -> list[str]:
    """The temporary directories of ``source``'s version that runs which did not finish left
    (tfds names them ``incomplete.<6 random characters>_<version>``)."""
    parent = os.path.dirname(prepared_dir(data_dir, source))
    if not os.path.isdir(parent):
        return []
    pattern = re.escape(tfds.core.constants.INCOMPLETE_PREFIX) + r"[A-Z0-9]{6}_" + re.escape(source.version)
    return sorted(os.path.join(parent, d) for d in os.listdir(parent) if re.fullmatch(pattern, d))


def remove_unfinished(data_dir: str, source: Source, stream: TextIO) -> None:
    """Removes what earlier runs that were killed left (see ``unfinished``), and says so.

    Call with the lock of the dataset's directory held: a live run's directory looks the same.
    """
    found = unfinished(data_dir, source)
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    if found:
        print(f"Removed {', '.join(found)}: left by an earlier `segtrain prepare` of {source.name} that did "
              f"not finish.", file=stream, flush=True)


# A worker process starts by importing TensorFlow (about 6 s of CPU); decoding and checking an
# example takes milliseconds, so a worker pays for itself only over hundreds of examples.
EXAMPLES_PER_WORKER = 500


def default_workers(total: int) -> int:
    """Worker processes for ``total`` examples when --num_workers is not given: every core, but no
    more than one per ``EXAMPLES_PER_WORKER`` examples (a small dataset is decoded here)."""
    return max(1, min(os.cpu_count() or 1, -(-total // EXAMPLES_PER_WORKER)))


def prepare(
    source: Source,
    source_dir: str,
    data_dir: str,
    num_workers: int | None = None,
    skip_bad_examples: bool = False,
    overwrite: bool = False,
    splits: Sequence[str] | None = None,
    stream: TextIO | None = None,
) -> dict:
    """Checks every example of ``source`` under ``source_dir`` and writes the tfds dataset.

    Args:
      source: the dataset layout.
      source_dir: the raw files.
      data_dir: where the prepared dataset goes (``<data_dir>/<name>/<version>``).
      num_workers: processes that decode and check examples (default: every CPU core, but no
        more than one per ``EXAMPLES_PER_WORKER`` examples; 1 decodes in this process).
      skip_bad_examples: leave bad examples out (listed in skipped_examples.txt) instead of failing.
      overwrite: rebuild a dataset that is already prepared.
      splits: the splits to prepare (default: every split of the dataset), e.g. Cityscapes'
        train and val without its test images.
      stream: where progress goes (stdout).

    Returns:
      {'path': ..., 'splits': {split: examples written}, 'skipped': [Problem, ...]}.

    Raises:
      SegtrainError: an unknown split, missing directories or split lists, empty splits, or bad
        examples (all of them listed) without ``skip_bad_examples``. Nothing is written then.
    """
    stream = stream or sys.stdout
    if splits:
        unknown = [s for s in splits if s not in source.splits]
        if unknown:
            raise SegtrainError(f"--splits: dataset '{source.name}' has no split {', '.join(map(repr, unknown))}; "
                                f"it has {', '.join(source.splits)}.")
        splits = [s for s in source.splits if s in splits]
    else:
        splits = list(source.splits)
    if not data_dir:
        raise SegtrainError("--data_dir is required: where the prepared dataset is written.")
    if not source_dir:
        raise SegtrainError(f"--source_dir is required: the directory holding the raw {source.name} files. {source.layout}")
    source_dir = os.path.abspath(os.path.expanduser(source_dir))
    target = prepared_dir(data_dir, source)
    remove_unfinished(data_dir, source, stream)
    if is_prepared(data_dir, source) and not overwrite:
        have = ", ".join(prepared_splits(data_dir, source))
        print(f"{source.name} is already prepared in {target} (splits {have}); --overwrite rebuilds it.", file=stream)
        return {"path": target, "splits": {}, "skipped": []}

    examples: dict[str, list[Example]] = {}
    pairing: list[Problem] = []
    for split in splits:
        found, problems = source.list_split(source_dir, split)
        pairing += problems
        if not found:
            raise SegtrainError(
                f"{source.name}: split '{split}' in {source_dir} has no usable example"
                + (f" ({len(problems)} files without a partner, e.g. {problems[0]})." if problems else ".")
            )
        examples[split] = found
    if pairing and not skip_bad_examples:
        raise SegtrainError(problems_message(
            pairing, f"{source.name} in {source_dir}",
            "Add the missing files or remove the strays, or run again with --skip_bad_examples. Nothing was written.",
        ))
    total = sum(len(v) for v in examples.values())
    workers = max(1, min(num_workers or default_workers(total), total))
    sizes = ", ".join(f"{s} {len(v)}" for s, v in examples.items())
    print(f"Preparing {source.name} from {source_dir} into {target}: {sizes} examples, {workers} worker(s).",
          file=stream, flush=True)

    job = _Job(source, examples, workers, skip_bad_examples, stream, source_dir, problems=list(pairing))
    builder = builder_class(source.name, source.version, bands_layout(source))(data_dir=os.path.expanduser(data_dir))
    builder.job = job
    builder.info.metadata.update(job.metadata)  # the info was built when the builder was made
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    config = tfds.download.DownloadConfig(manual_dir=source_dir, try_download_gcs=False, download_mode=mode)
    tfds.disable_progress_bar()
    try:
        # tfds' download directory (unused) goes to a scratch directory, and its own messages
        # (which speak of downloading) to nowhere: the progress lines above say what happens.
        with tempfile.TemporaryDirectory(prefix="segtrain-prepare-") as scratch, \
                contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_dir=scratch, download_config=config)
    except BrokenProcessPool:
        raise SegtrainError(
            f"A worker process of `segtrain prepare` died (it was killed: out of memory?). Nothing was "
            f"written to {target}. Run again, with fewer --num_workers (now {workers}) if memory is short."
        ) from None
    finally:
        job.close()

    skipped = job.problems
    if skipped:
        print(f"Skipped {len(skipped)} bad example(s); the list is in {os.path.join(target, SKIPPED_FILE)}.",
              file=stream)
    written = ", ".join(f"{s} {n}" for s, n in job.written.items())
    left_out = [s for s in source.splits if s not in job.written]
    note = f" Not prepared: {', '.join(left_out)} (--splits)." if left_out else ""
    print(f"Prepared {source.name} in {target}: {written} examples.{note}", file=stream, flush=True)
    return {"path": target, "splits": dict(job.written), "skipped": skipped}


def prepared_splits(data_dir: str, source: Source) -> list[str]:
    """The splits of the prepared copy of ``source`` under ``data_dir``."""
    builder = builder_class(source.name, source.version, bands_layout(source))(data_dir=os.path.expanduser(data_dir))
    return sorted(builder.info.splits)


def load_prepared(source: Source, split: str, data_dir: str,
                  skip_damaged_records: bool = False) -> tuple[tf.data.Dataset, DatasetInfo]:
    """The prepared ``split`` as encoded examples, and its DatasetInfo (with ``decode`` set).

    With ``skip_damaged_records`` the split's shards are read once first (segtrain.data.verify):
    a damaged shard is then read up to its first damaged record, and what it leaves out is
    counted (``DatasetInfo.damaged_records``) and said.
    """
    path = prepared_dir(data_dir, source)
    if not is_prepared(data_dir, source):
        why = "an earlier `segtrain prepare` did not finish; " if unfinished(data_dir, source) else ""
        raise SegtrainError(
            f"No prepared {source.name} dataset (version {source.version}) in {path}: {why}run "
            f"`segtrain prepare --dataset={source.name} --source_dir=RAW --data_dir={data_dir}` first, "
            f"or read the raw files with datasets.{source.name}.source_dir."
        )
    builder = builder_class(source.name, source.version)(data_dir=os.path.expanduser(data_dir))
    meta = dict(builder.info.metadata or {})
    bands = (int(meta["channels"]), str(meta["image_dtype"])) if "channels" in meta else None
    if bands:  # the copy says how its images are stored, whatever the settings say now
        builder = builder_class(source.name, source.version, bands)(data_dir=os.path.expanduser(data_dir))
    splits = builder.info.splits
    if split not in splits:
        raise SegtrainError(
            f"The prepared {source.name} dataset in {path} has no split {split!r}; it has {', '.join(sorted(splits))}. "
            f"To add it, run `segtrain prepare --dataset={source.name}` again with --overwrite (and --splits naming it)."
        )
    info = DatasetInfo(
        num_classes=int(meta["num_classes"]),
        ignore_label=int(meta["ignore_label"]),
        class_names=tuple(meta["class_names"]),
        palette=tuple(tuple(c) for c in meta["palette"]),
        num_examples={s: splits[s].num_examples for s in splits},
        name=source.name,
        decode=decode_prepared if bands is None else functools.partial(decode_prepared_bands, bands=bands),
        decode_region=decode_prepared_region if bands is None else None,
        labels_checked=True,
        multilabel=bool(meta.get("multilabel", False)),
        **({"channels": bands[0], "image_dtype": bands[1],
            "channel_mean": {k: tuple(v) for k, v in meta["channel_mean"].items()},
            "channel_std": {k: tuple(v) for k, v in meta["channel_std"].items()}} if bands else {}),
        # Datasets prepared before the counts were recorded have none (losses say so).
        class_pixel_counts={k: tuple(v) for k, v in meta.get("class_pixel_counts", {}).items()},
        class_image_pixels={k: tuple(v) for k, v in meta.get("class_image_pixels", {}).items()},
    )
    if skip_damaged_records:
        damages = verify.verified(builder, split)
        if damages:
            lost = sum(d.lost for d in damages)
            warn(f"datasets.{source.name}.skip_damaged_records: leaving out {lost} record(s) of split '{split}' in "
                 f"{path}: " + "; ".join(d.describe() for d in damages)
                 + f". Rebuild it with `{verify.rebuild_command(source.name, data_dir)}`.")
            info = dataclasses.replace(info, damaged_records={split: lost})
            decoders = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
            ds = verify.read_good_records(builder, split, damages).map(
                lambda record: builder.info.features.deserialize_example(record, decoders=decoders))
            return ds, info
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()},
        # No cardinality assertion: a tf.data service worker in a distributed_epoch job reads
        # only the record files the dispatcher hands it, fewer than the split's examples.
        # Evaluation, which counts batches, states the cardinality again (build_pipeline).
        read_config=tfds.ReadConfig(try_autocache=False, assert_cardinality=False),
    )
    return ds, info


def decode_prepared(example: dict) -> dict:
    """Encoded prepared example -> {'image': uint8 [H,W,3], 'label': uint8 [H,W], 'key'}."""
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    label = tf.io.decode_png(example["label"], channels=1)[..., 0]
    return {"image": image, "label": label, "key": example["key"]}


def decode_prepared_bands(example: dict, bands: tuple[int, str]) -> dict:
    """A prepared bands example (zlib-compressed pixels) -> {'image': uint8|uint16 [H,W,C], ...}."""
    stored = example["image"]
    pixels = tf.io.decode_raw(tf.io.decode_compressed(stored["value"], "ZLIB"), tf.dtypes.as_dtype(bands[1]))
    image = tf.ensure_shape(tf.reshape(pixels, stored["shape"]), [None, None, bands[0]])
    label = tf.io.decode_png(example["label"], channels=1)[..., 0]
    return {"image": image, "label": label, "key": example["key"]}


def decode_prepared_region(example: dict, choose) -> dict:
    """``decode_prepared`` of a region only: a JPEG decodes just the region's pixels.

    The region is chosen from the label's size, which `segtrain prepare` checked is the image's.
    """
    label = tf.io.decode_png(example["label"], channels=1)[..., 0]
    offset, extent = choose(tf.shape(label))
    data = example["image"]

    def jpeg():
        return tf.io.decode_and_crop_jpeg(data, tf.concat([offset, extent], 0), channels=3)

    def other():
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([extent, [3]], 0))

    image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    return {"image": image, "label": tf.slice(label, offset, extent), "key": example["key"]}


def read_all(ds: tf.data.Dataset, info: DatasetInfo) -> list[dict]:
    """Every example of a (small) dataset, decoded, as NumPy dicts (tests, tools)."""
    if info.decode is not None:
        ds = ds.map(info.decode)
    return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()} for ex in tfds.as_numpy(ds)]

