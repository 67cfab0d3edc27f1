"""`segtrain prepare`: check a dataset's raw files once and store them as a tfds dataset."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import Sequence

import gin

from registry import DATASETS
from segtrain.commands.configure import parse_config
from segtrain.data.files import preparable
from segtrain.data.prepare import prepare, prepared_dir
from segtrain.data.raw import Source
from segtrain.errors import SegtrainError
from segtrain.runtime.lock import DirectoryLock


def run(dataset: str | None, source_dir: str | None, data_dir: str | None, gin_files: Sequence[str],
        gin_params: Sequence[str], num_workers: int | None = None, skip_bad_examples: bool = False,
        overwrite: bool = False, splits: Sequence[str] | None = None) -> int:
    """Prepares ``dataset`` with its settings from gin (``datasets.<name>.*``) and the flags.

    ``source_dir`` and ``data_dir`` fall back to ``datasets.<name>.source_dir`` / ``data_dir``.
    """
    if not dataset:
        raise SegtrainError("--dataset is required, e.g. --dataset=voc2012 (`segtrain list` shows the datasets).")
    parse_config(gin_files, gin_params)
    bound = gin.get_bindings(f"datasets.{dataset}") if dataset in DATASETS else {}
    src, data_dir = source(dataset, bound), data_dir or bound.get("data_dir")
    # One job at a time writes a dataset's directory: the leftovers of a killed run, which
    # prepare removes, look like those of a live one.
    lock = (DirectoryLock(os.path.dirname(prepared_dir(data_dir, src)), "`segtrain prepare`") if data_dir
            else contextlib.nullcontext())
    with lock:
        prepare(
            src,
            source_dir=source_dir or bound.get("source_dir"),
            data_dir=data_dir,
            num_workers=num_workers,
            skip_bad_examples=skip_bad_examples,
            overwrite=overwrite,
            splits=splits,
        )
    return 0


def verify_prepared(dataset: str | None, data_dir: str | None, gin_files: Sequence[str], gin_params: Sequence[str],
                    splits: Sequence[str] | None = None) -> int:
    """Reads every record of a prepared dataset; prints what is damaged; 1 if anything is, else 0."""
    from segtrain.data import verify
    from segtrain.data.prepare import builder_class, is_prepared

    if not dataset:
        raise SegtrainError("--dataset is required, e.g. --dataset=voc2012 (`segtrain list` shows the datasets).")
    parse_config(gin_files, gin_params)
    bound = gin.get_bindings(f"datasets.{dataset}") if dataset in DATASETS else {}
    src, data_dir = source(dataset, bound), data_dir or bound.get("data_dir")
    if not data_dir:
        raise SegtrainError("--data_dir is required with --verify: where `segtrain prepare` wrote the dataset.")
    path = prepared_dir(data_dir, src)
    if not is_prepared(data_dir, src):
        raise SegtrainError(f"No prepared {dataset} dataset (version {src.version}) in {path}: nothing to verify.")
    builder = builder_class(src.name, src.version)(data_dir=os.path.expanduser(data_dir))
    have = sorted(builder.info.splits)
    unknown = [s for s in splits or () if s not in have]
    if unknown:
        raise SegtrainError(f"--splits: the prepared {dataset} dataset in {path} has no split "
                            f"{', '.join(map(repr, unknown))}; it has {', '.join(have)}.")
    chosen = list(splits or have)
    damages = verify.verify(builder, chosen, progress="verify")
    for split in chosen:
        records = sum(n for _, n in verify.shards(builder, split))
        bad = [d for d in damages if d.split == split]
        state = "ok" if not bad else f"{len(bad)} damaged shard(s), {sum(d.lost for d in bad)} record(s) lost"
        print(f"{split}: {len(verify.shards(builder, split))} shard(s), {records} records: {state}")
    if damages:
        print(f"error: {verify.damage_message(dataset, path, data_dir, damages)}", file=sys.stderr)
        return 1
    print(f"Every record of {dataset} in {path} reads.")
    return 0


def source(name: str, settings: dict) -> Source:
    """The Source of registered dataset ``name``, with the settings that its class takes.

    Raises:
      RegistryError / SegtrainError: an unknown dataset, or one without raw files to prepare.
    """
    source_cls = preparable(DATASETS.original(name))
    if source_cls is None:
        names = [n for n in DATASETS.names() if preparable(DATASETS.original(n))]
        raise SegtrainError(f"Dataset '{name}' has no raw files to prepare; preparable datasets: {', '.join(names)}.")
    accepted = inspect.signature(source_cls).parameters
    return source_cls(**{k: v for k, v in settings.items() if k in accepted})
