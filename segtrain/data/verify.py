"""Damaged prepared data: which shard file of which split, at which byte, and how to rebuild it.

A prepared dataset (`segtrain prepare`) stores each split as TFRecord shard files, and its
metadata records how many examples each shard holds. Every record carries a CRC32C of its
length and of its bytes, which TensorFlow checks as it reads: a changed byte is a "corrupted
record", a file cut short a "truncated record", and a shard file can be missing altogether.
TensorFlow's own error names only the byte offset; ``verify`` reads the shards (without decoding
a single image) to name the file, and ``damage_message`` says what to do.

``read_good_records`` is the opt-in way around damage (``datasets.<name>.skip_damaged_records``):
TFRecord cannot find the next record after a damaged one, so a damaged shard is read up to its
first damaged record, and the rest of that shard is left out, counted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import tensorflow as tf

from segtrain.progress import Progress


@dataclasses.dataclass(frozen=True)
class Damage:
    """One damaged shard file of a prepared split.

    Attributes:
      split: the split it belongs to.
      path: the shard file.
      offset: the byte offset of the first record that fails (None: the file is missing).
      reason: what is wrong, in words.
      good: the records before the damage.
      expected: the records the dataset's metadata says the shard holds.
    """

    split: str
    path: str
    offset: int | None
    reason: str
    good: int
    expected: int

    @property
    def lost(self) -> int:
        return max(self.expected - self.good, 0)

    def describe(self) -> str:
        where = f" at byte {self.offset}" if self.offset is not None else ""
        return f"split '{self.split}', {os.path.basename(self.path)}{where}: {self.reason}"


def shards(builder, split: str) -> list[tuple[str, int]]:
    """(shard file, records it holds) of ``split``, as the prepared dataset's metadata lists them."""
    info = builder.info.splits[split]
    return [(os.fspath(path), int(n)) for path, n in zip(info.filepaths, info.shard_lengths)]


def check_shard(split: str, path: str, expected: int) -> Damage | None:
    """Reads every record of one shard file (checking its CRCs); the damage found, or None."""
    if not tf.io.gfile.exists(path):
        return Damage(split, path, None, "the file is missing", 0, expected)
    good = 0
    try:
        for _ in tf.data.TFRecordDataset(path):
            good += 1
    except tf.errors.DataLossError as e:
        match = re.search(r"(corrupted|truncated) record at (\d+)", str(e))
        offset = int(match.group(2)) if match else None
        reason = ("a record fails its checksum (bytes changed on disk)" if match and match.group(1) == "corrupted"
                  else "the file is cut short (truncated)")
        return Damage(split, path, offset, reason, good, expected)
    if good != expected:
        return Damage(split, path, tf.io.gfile.stat(path).length, f"it holds {good} records, its metadata says "
                      f"{expected} (cut short at a record boundary)", good, expected)
    return None


def verify(builder, splits: Sequence[str], progress: str | None = None) -> list[Damage]:
    """Every damaged shard of ``splits`` (all shards read once; ``progress``: a progress line's name)."""
    files = [(split, path, n) for split in splits for path, n in shards(builder, split)]
    line = Progress(progress, len(files), unit="shard") if progress else None
    found = []
    for i, (split, path, n) in enumerate(files, start=1):
        damage = check_shard(split, path, n)
        if damage:
            found.append(damage)
        if line:
            line.update(i)
    if line:
        line.close()
    return found


_VERIFIED: dict[tuple, list[Damage]] = {}


def verified(builder, split: str) -> list[Damage]:
    """``verify`` of one split, once per process for the same files (a run reads a split's
    info and its examples separately)."""
    key = (split, *((path, tf.io.gfile.stat(path).mtime_nsec if tf.io.gfile.exists(path) else None)
                    for path, _ in shards(builder, split)))
    if key not in _VERIFIED:
        _VERIFIED[key] = verify(builder, [split], progress=f"verify {split}")
    return _VERIFIED[key]


def rebuild_command(name: str, data_dir: str) -> str:
    return f"segtrain prepare --dataset={name} --source_dir=RAW --data_dir={data_dir} --overwrite"


def damage_message(name: str, prepared: str, data_dir: str, damages: Sequence[Damage]) -> str:
    """One message for damaged prepared data: where, and the command that rebuilds it."""
    shown = "; ".join(d.describe() for d in damages[:5]) + (f"; and {len(damages) - 5} more" if len(damages) > 5 else "")
    return (f"The prepared {name} dataset in {prepared} is damaged: {shown}. Rebuild it from the raw files "
            f"(RAW: the folder you prepared it from): `{rebuild_command(name, data_dir)}`. To train without "
            f"the damaged records instead, set datasets.{name}.skip_damaged_records = True.")


def is_damaged_read(error: BaseException) -> bool:
    """Whether ``error``, raised while reading examples, says a record file is damaged or missing."""
    if isinstance(error, tf.errors.DataLossError):
        return True
    return isinstance(error, tf.errors.NotFoundError) and ".tfrecord" in str(error)


def read_good_records(builder, split: str, damages: Sequence[Damage]) -> tf.data.Dataset:
    """The split's serialized records, each damaged shard read up to its damage and no further
    (a missing shard left out), in the order of its shards."""
    damaged = {d.path for d in damages if d.offset is None}
    files = [path for path, _ in shards(builder, split) if path not in damaged]
    return tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda f: tf.data.TFRecordDataset(f).ignore_errors(), cycle_length=1)
