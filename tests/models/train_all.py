"""Trains tiny versions of models a few steps under several precision / XLA / replica settings.

    python -m tests.models.train_all '{"root": "/tmp/zoo", "models": ["unet"], "settings":
        {"float32, 2 replicas": {"precision": "float32", "xla": false, "replicas": 2}}}'

A process of its own: the CPU is split into two logical devices before TensorFlow starts.
A setting may name its own "models" and extra gin "bindings". Prints one line ``RESULT {setting:
{model: {"losses": [loss of each window], "disagree": [...], "drifting": n} or error}}`` at the end.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

# Every model trains on the same four `shapes` examples, drawn once into memory.
EXAMPLES = 4
SIZE = 72


def main(spec: dict) -> dict:
    from segtrain.runtime.distribute import split_cpu

    split_cpu(2)
    import gin

    from segtrain.commands.configure import parse_config
    from segtrain.errors import SegtrainWarning
    from segtrain.experiment import Experiment, ExperimentConfig
    from segtrain.train.trainer import Trainer
    from tests.conftest import TINY
    from tests.models import tiny

    import tensorflow as tf

    _register_fixed_batch()
    # One strategy of each kind for every model: a second MirroredStrategy in the same process
    # reuses the first one's collective instance keys, and the replicas' all-reduces then mismatch.
    strategies = {1: tf.distribute.OneDeviceStrategy("/cpu:0"),
                  2: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
    results: dict[str, dict] = {}
    for name, setting in spec["settings"].items():
        results[name] = {}
        for model in setting.get("models", spec["models"]):
            gin.clear_config()
            parse_config([], TINY + tiny.bindings(model) + list(setting.get("bindings", ())) + [
                f"train.precision = '{setting['precision']}'", f"train.xla = {setting['xla']}",
                "train.dataset = 'fixed_shapes_batch'", "train.batch_size = 4", "pipeline.crop_size = (64, 64)",
                # Momentum SGD: the loss falls within a few steps for every model, and its update
                # traces in a fraction of Adam's time (the optimizers have tests of their own).
                "optimizer.name = 'sgd'", "learning_rate.base = 0.01",
            ])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SegtrainWarning)
                start = time.perf_counter()
                try:
                    config = ExperimentConfig()
                    experiment = Experiment(config, strategies[setting["replicas"]], split=config.train_split)
                    model_dir = f"{spec['root']}/{model}-{setting['replicas']}"
                    results[name][model] = _train(Trainer(experiment, model_dir))
                except Exception as e:  # report every model, not just the first failure
                    results[name][model] = f"{type(e).__name__}: {e}"[:2000]
                print(f"{name}: {model}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return results


def _register_fixed_batch() -> None:
    """Registers dataset 'fixed_shapes_batch': the first `shapes` training examples, in memory.

    Building `shapes` traces its drawing ops for a second or two on every read; every model
    here reads the same few examples, so they are drawn once.
    """
    import dataclasses

    import numpy as np
    import tensorflow as tf

    from registry import DATASETS

    ds, info = DATASETS.get("shapes")(split="train", num_train=EXAMPLES, min_size=SIZE, max_size=SIZE)
    examples = list(ds.as_numpy_iterator())
    arrays = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    info = dataclasses.replace(info, name="fixed_shapes_batch", num_examples={"train": EXAMPLES})

    @DATASETS.register("fixed_shapes_batch", override=True)
    def fixed_shapes_batch(split: str = "train"):
        return tf.data.Dataset.from_tensor_slices(arrays), info


def _train(trainer, windows: int = 3, steps: int = 3) -> dict:
    """The trainer's own compiled windows, without the actions of fit(): the loss of each, and
    the variables whose copies on the replicas differ at each window's end."""
    from segtrain.train import replicas

    iterator, crop = trainer.iterator(seed=0)
    trainer._check_output(crop)
    trainer.decorrelate_replicas()
    losses, disagree = [], []
    for window in range(windows):
        losses.append(trainer.train_window(iterator, window * steps, steps, first=window == 0).scalars["loss"])
        disagree.append(replicas.disagreements(trainer.strategy, trainer.state_variables()))
    return {"losses": losses, "disagree": disagree, "drifting": len(trainer._drifting)}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
