#!/usr/bin/env python3
"""What checking a checkpoint costs at a resume: DeepLab v3 (ResNet-50) with its Adam slots.

    python benchmarks/bench_checkpoint.py [--model=deeplabv3] [--rounds=5]

A resume restores the latest checkpoint; TensorFlow checks every tensor it reads against the
CRC32C the index recorded, so the restore is the check. segtrain adds one look at the files
before it (``run_dir.problem``: the index read, the shards counted), and reads a checkpoint a
second time only when something is wrong (``run_dir.reads``, to list the ones that read). In
one process, with the files in the page cache after a first read, this times:

  read      the checkpoint's files read into memory (the floor of any restore)
  problem   run_dir.problem: what segtrain adds to a resume
  restore   tf.train.Checkpoint.restore of model, optimizer and step (checksums included)
  reads     run_dir.reads: every tensor read through the checkpoint reader (the error path)
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deeplabv3")
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    import keras
    import tensorflow as tf

    import segtrain.models  # noqa: F401  (registers the models)
    from registry import MODELS
    from segtrain import run_dir

    model = MODELS.get(args.model)(num_classes=args.classes)
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    directory = tempfile.mkdtemp(prefix="bench-checkpoint-")
    path = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step).save(os.path.join(directory, "ckpt"))
    size = sum(os.path.getsize(f) for f in glob.glob(path + ".*"))
    target = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)

    def read():
        for f in glob.glob(path + ".*"):
            with open(f, "rb") as handle:
                while handle.read(1 << 24):
                    pass

    timings = {"read": read, "problem": lambda: run_dir.problem(path),
               "restore": lambda: target.restore(path).assert_existing_objects_matched(),
               "reads": lambda: run_dir.reads(path)}
    for fn in timings.values():  # warm the page cache and TensorFlow up
        fn()
    seconds = {name: [] for name in timings}
    for _ in range(args.rounds):
        for name, fn in timings.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    print(f"bench_checkpoint: {datetime.date.today()}, {platform.machine()}, TensorFlow {tf.__version__}, "
          f"{args.model} ({model.count_params() / 1e6:.1f} M parameters) with Adam: {size / 2**20:.0f} MiB, "
          f"{args.rounds} rounds")
    for name, values in seconds.items():
        print(f"  {name:<8} {median[name] * 1000:9.1f} ms (median; {min(values) * 1000:.1f}-{max(values) * 1000:.1f})"
              f"  {median[name] / median['read']:.2f}x read")
    print(f"  segtrain's look before a restore: {median['problem'] / median['restore'] * 100:.2f}% of the restore")


if __name__ == "__main__":
    main()
