"""Trains tiny versions of models a few steps under one precision / XLA / replica setting.

    python -m tests.models.train_all '{"precision": "float32", "xla": false, "replicas": 2,
                                       "runs": {"unet": "/tmp/run_unet"}}'

A process of its own: the CPU is split into two logical devices before TensorFlow starts.
Prints one line ``RESULT {model: [loss of each window] or error}`` at the end.
"""

from __future__ import annotations

import json
import sys
import time
import warnings


def main(spec: dict) -> dict:
    from segtrain.train.distribute import split_cpu

    split_cpu(2)
    import gin

    from segtrain.commands.configure import parse_config
    from segtrain.errors import SegtrainWarning
    from segtrain.experiment import Experiment, ExperimentConfig
    from segtrain.train.trainer import Trainer
    from tests.conftest import TINY
    from tests.models import tiny

    import tensorflow as tf

    # One strategy for every model: a second MirroredStrategy in the same process reuses the
    # first one's collective instance keys, and the replicas' all-reduces then mismatch.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if spec["replicas"] == 2 \
        else tf.distribute.OneDeviceStrategy("/cpu:0")
    results = {}
    for model, model_dir in spec["runs"].items():
        gin.clear_config()
        parse_config([], TINY + tiny.bindings(model) + [
            f"train.precision = '{spec['precision']}'", f"train.xla = {spec['xla']}",
            "train.batch_size = 4", "pipeline.crop_size = (64, 64)", "datasets.shapes.num_train = 4",
            "datasets.shapes.min_size = 64", "datasets.shapes.max_size = 72",
        ])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SegtrainWarning)
            start = time.perf_counter()
            try:
                config = ExperimentConfig()
                results[model] = _train(Trainer(Experiment(config, strategy, split=config.train_split), model_dir))
            except Exception as e:  # report every model, not just the first failure
                results[model] = f"{type(e).__name__}: {e}"[:2000]
            print(f"{model}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return results


def _train(trainer, windows: int = 3, steps: int = 3) -> list[float]:
    """The trainer's own compiled windows, without the actions of fit()."""
    iterator, crop = trainer.iterator(seed=0)
    trainer._check_output(crop)
    losses = []
    for window in range(windows):
        losses.append(trainer.train_window(iterator, window * steps, steps, first=window == 0).scalars["loss"])
    return losses


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
