"""Looks at every replica's copy of the training state on two logical CPU devices.

    python -m tests.train.replicas_check

A process of its own: the CPU is split before TensorFlow starts. Prints one line
``RESULT {check: {...}}`` with what each check saw; tests/train/test_replicas.py asserts on it.
"""

from __future__ import annotations

import json
import warnings

import numpy as np


def main() -> dict:
    from segtrain.runtime.distribute import split_cpu

    split_cpu(2)
    import gin
    import keras
    import tensorflow as tf

    from segtrain.commands.configure import parse_config
    from segtrain.errors import SegtrainWarning
    from segtrain.experiment import Experiment, ExperimentConfig
    from segtrain.train import replicas as R
    from segtrain.train.trainer import Trainer
    from tests.conftest import TINY

    warnings.simplefilter("ignore", SegtrainWarning)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    root = __import__("tempfile").mkdtemp(prefix="replicas-check-")
    out: dict[str, dict] = {}

    def trainer(*bindings: str) -> Trainer:
        gin.clear_config()
        parse_config([], TINY + list(bindings))
        config = ExperimentConfig()
        return Trainer(Experiment(config, strategy, split=config.train_split), f"{root}/{len(out)}")

    def per_replica(fn, *args):
        return [np.asarray(x) for x in strategy.experimental_local_results(
            tf.function(lambda: strategy.run(fn, args=args))())]

    # Batch norm: each replica's statistics follow its own data within a window; at the window's
    # end they are averaged. Without the average (what a Keras 3 model does by itself) they differ.
    t = trainer()
    iterator, _ = t.iterator(0)
    before = [np.mean([c for c in R.local_copies(strategy, v)], axis=0) for v in t._drifting]
    window = t.train_window(iterator, 0, 3, first=True)
    synced = R.disagreements(strategy, t.state_variables())
    drifting = t._drifting
    t._drifting = []  # the same trainer, its window traced anew without the average
    t._train_loop = tf.function(t._loop)
    t.train_window(iterator, 3, 3, first=True)
    unsynced = R.disagreements(strategy, t.state_variables())
    out["batch_norm"] = {"drifting": [v.path for v in drifting], "after_window": synced, "without_average": unsynced,
                         "loss": float(window.scalars["loss"]),
                         "moved": any(not np.allclose(b, R.local_copies(strategy, v)[0]) for b, v in zip(before, drifting))}

    # Dropout: after decorrelate_replicas, the same image gets another mask on each replica.
    t = trainer("models.unet.dropout = 0.5")
    image = tf.ones([1, 32, 32, 3])
    dropout = t.model.get_layer("bottleneck.dropout")
    features = keras.Model(t.model.inputs, dropout.output)
    same = per_replica(lambda: features(image, training=True))
    t.decorrelate_replicas()
    masks = per_replica(lambda: features(image, training=True))
    again = per_replica(lambda: features(image, training=True))
    out["dropout"] = {"before": bool(np.array_equal(same[0] != 0, same[1] != 0)),
                      "after": bool(np.array_equal(masks[0] != 0, masks[1] != 0)),
                      "next_draw_differs": bool(not np.array_equal(masks[0], again[0])),
                      "seeds": [R.local_copies(strategy, s)[0].tolist() for s in t._seed_states] +
                               [R.local_copies(strategy, s)[1].tolist() for s in t._seed_states]}

    # train.on_nan = 'restore': the restore brings every copy back to the checkpoint's, then the
    # replicas' seeds apart again; the learning-rate factor is one for all.
    t = trainer("models.unet.dropout = 0.5", "train.on_nan = 'restore'")
    t.decorrelate_replicas()
    path = t.checkpoints.save(0)
    iterator, _ = t.iterator(0)
    t.train_window(iterator, 0, 3, first=True)
    t.restore_after_nan(path, 0.25)
    out["nan_restore"] = {"disagree": R.disagreements(strategy, t.state_variables()),
                          "lr_factor": [float(c) for c in R.local_copies(strategy, t.lr_factor)],
                          "step": [int(c) for c in R.local_copies(strategy, t.step)],
                          "seed_gap": [int(R.local_copies(strategy, s)[1][0] - R.local_copies(strategy, s)[0][0])
                                       for s in t._seed_states],
                          "checkpointed": [name for name, _ in tf.train.list_variables(path) if "seed" in name]}

    # Colour jitter on the device: each replica finishes its own examples with their own draws.
    t = trainer("pipeline.colour_on_device = True", "pipeline.brightness = 0.2", "pipeline.contrast = (0.8, 1.2)")
    iterator, _ = t.iterator(0)
    batch = next(iterator)
    draws = {k: [np.asarray(x) for x in strategy.experimental_local_results(v)] for k, v in batch["colour"].items()}
    out["colour"] = {k: bool(np.array_equal(v[0], v[1])) for k, v in draws.items()}

    # A float16 step whose gradient overflows on replica 1 only: skipped on both.
    with strategy.scope():
        w = keras.Variable(np.ones(3, np.float32), name="w")
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        optimizer.build([w])

    def overflow_on_replica_1(agree: bool):
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        grad = tf.where(replica == 1, tf.constant([np.inf, 1.0, 1.0]), tf.constant([1.0, 1.0, 1.0]))
        grads = R.finite_everywhere([grad]) if agree else [grad]
        optimizer.apply_gradients(zip(grads, [w]))

    def state():
        return {"w": [c.tolist() for c in R.local_copies(strategy, w)],
                "scale": [float(c) for c in R.local_copies(strategy, optimizer.dynamic_scale)],
                "agree": R.disagreements(strategy, [w, *optimizer.variables])}

    tf.function(lambda: strategy.run(overflow_on_replica_1, args=(True,)))()
    agreed = state()
    tf.function(lambda: strategy.run(overflow_on_replica_1, args=(False,)))()
    out["loss_scale"] = {"agreed": agreed, "keras_alone": state()}

    # What the fingerprint sees: a copy changed on replica 1 alone.
    with strategy.scope():
        v = tf.Variable(np.zeros(4, np.float32), name="probe")
    equal = R.fingerprint(strategy, [v])
    tf.function(lambda: strategy.run(
        lambda: v.assign(tf.fill([4], tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group,
                                              tf.float32)))))()
    out["fingerprint"] = {"equal": equal, "drifted": R.fingerprint(strategy, [v]), "shown": v.numpy().tolist(),
                          "named": R.disagreements(strategy, [v])}
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()), flush=True)
