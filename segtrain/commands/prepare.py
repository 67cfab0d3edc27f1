"""`segtrain prepare`: check a dataset's raw files once and store them as a tfds dataset."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import Sequence

import gin
from absl import flags

from registry import DATASETS
from segtrain.commands.common_flags import gin_flags, verbosity_flag
from segtrain.commands.configure import parse_config
from segtrain.data.files import preparable
from segtrain.data.prepare import EXAMPLES_PER_WORKER, prepare, prepared_dir
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


def define_flags(fv):
    gin_flags(fv)
    flags.DEFINE_string("dataset", None, "The dataset's registry name (voc2012, voc2012_aug, oxford_iiit_pet, "
                        "cityscapes, folder); its other settings come from --gin_file/--gin_param "
                        "(datasets.NAME.*).", flag_values=fv)
    flags.DEFINE_string("source_dir", None, "The directory holding the raw files (gin: datasets.NAME.source_dir).",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", None, "Where the prepared dataset is written (gin: datasets.NAME.data_dir).",
                        flag_values=fv)
    flags.DEFINE_integer("num_workers", None, "Processes that decode and check images (default: all cores, at most one per "
                         f"{EXAMPLES_PER_WORKER} images).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_list("splits", None, "The splits to prepare, e.g. train,val (default: all of the dataset's).",
                      flag_values=fv)
    flags.DEFINE_bool("skip_bad_examples", False, "Leave out bad examples (listed in skipped_examples.txt in the "
                      "prepared dataset) instead of stopping.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Rebuild a dataset that is already prepared.", flag_values=fv)
    flags.DEFINE_bool("verify", False, "Read every record of the prepared dataset (of --splits, default all) and "
                      "report damaged or missing shard files; exit 1 if there are any. Writes nothing.",
                      flag_values=fv)
    verbosity_flag(fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain prepare` (or, with --verify, the check of a prepared dataset) from its flags."""
    if fv.verify:
        return verify_prepared(fv.dataset, fv.data_dir, fv.gin_file, fv.gin_param, fv.splits)
    return run(fv.dataset, fv.source_dir, fv.data_dir, fv.gin_file, fv.gin_param, fv.num_workers,
               fv.skip_bad_examples, fv.overwrite, fv.splits)
