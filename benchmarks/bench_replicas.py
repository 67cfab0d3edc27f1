#!/usr/bin/env python3
"""What keeping the replicas equal costs: a training window with and without the window-end
average of the batch-norm statistics (segtrain.train.replicas), in the same process.

    python benchmarks/bench_replicas.py                    # quickstart U-Net, 2 logical CPUs
    python benchmarks/bench_replicas.py --replicas=4 --steps=5 --rounds=20

The trainer's compiled window is traced twice: as segtrain runs it (``averaged``), and with the
average left out (``alone``: what a Keras 3 model does by itself, its replicas' statistics
drifting apart). The rounds alternate which goes first; the ratio alone/averaged per round, its
median and spread, say what the one all-reduce per window costs. Fewer steps per window make
the average count more (``--steps``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2, help="logical CPU devices to mirror over")
    p.add_argument("--steps", type=int, default=20, help="steps per window (train.steps_per_loop)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--gin_file", default=os.path.join(REPO, "gin", "quickstart.gin"))
    args = p.parse_args()
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    from segtrain.runtime.distribute import split_cpu

    devices = split_cpu(args.replicas)
    import tensorflow as tf

    from segtrain.commands.configure import parse_config
    from segtrain.experiment import Experiment, ExperimentConfig
    from segtrain.train.trainer import Trainer

    parse_config([args.gin_file], [f"train.steps_per_loop = {args.steps}"])
    strategy = tf.distribute.MirroredStrategy(devices)
    config = ExperimentConfig()
    import tempfile

    trainer = Trainer(Experiment(config, strategy, split=config.train_split), tempfile.mkdtemp())
    iterator, _ = trainer.iterator(0)
    averaged = tf.function(trainer._loop)
    drifting, trainer._drifting = trainer._drifting, []
    alone = tf.function(trainer._loop)
    trainer._drifting = drifting
    n = tf.constant(args.steps)

    def timed(loop) -> float:
        t0 = time.perf_counter()
        losses, _ = loop(iterator, n)
        losses.numpy()
        return time.perf_counter() - t0

    for loop in (averaged, alone):  # trace both first
        timed(loop)
    ratios, seconds = [], {"averaged": [], "alone": []}
    for i in range(args.rounds):
        order = (("averaged", averaged), ("alone", alone)) if i % 2 == 0 else (("alone", alone), ("averaged", averaged))
        took = {name: timed(loop) for name, loop in order}
        for name, t in took.items():
            seconds[name].append(t)
        ratios.append(took["alone"] / took["averaged"])
    print(f"bench_replicas: {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"TensorFlow {tf.__version__}, {args.replicas} replicas, {len(drifting)} batch-norm variables averaged, "
          f"{args.steps} steps of batch {config.batch_size} per window, {args.rounds} rounds")
    for name, values in seconds.items():
        print(f"  {name:<8} window {statistics.median(values) * 1000:8.1f} ms (median; {min(values) * 1000:.1f}-"
              f"{max(values) * 1000:.1f})")
    print(f"  alone/averaged: {statistics.median(ratios):.3f} (median; rounds {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
