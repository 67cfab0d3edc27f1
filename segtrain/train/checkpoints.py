"""Checkpoints in model_dir: the latest few for resuming, and the best one by a metric.

    model_dir/ckpt-<step>.*        latest checkpoints (tf.train.CheckpointManager)
    model_dir/best/ckpt-<step>.*   the best checkpoint so far
    model_dir/best/best.json       {"metric": ..., "value": ..., "step": ...}

TensorFlow writes checkpoint data under temporary names and renames it, and best.json is
written the same way, so an interrupted save never leaves a checkpoint that looks complete.
Weights that are not finite are never saved: the last good checkpoint stays the latest.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from segtrain.errors import SegtrainError
from segtrain.experiment import BEST_DIR, restore_checkpoint
from segtrain.io import read_json, write_json


class Checkpoints:
    """Saves and restores the trackables of a training run (model, optimizer, step).

    Args:
      model_dir: the run's directory.
      model: the model; its weights are checked before every save.
      max_to_keep: how many of the latest checkpoints to keep.
      write_dir: where this process saves (default model_dir). Multi-worker runs restore from
        the chief's model_dir on every worker, while the other workers save to scratch
        directories: each must take part in a save, but only the chief's is kept.
      **trackables: the other objects to checkpoint, e.g. optimizer=..., step=....
    """

    def __init__(self, model_dir: str, model: keras.Model, max_to_keep: int = 3, write_dir: str | None = None,
                 **trackables):
        self.model_dir = model_dir
        self.model = model
        write_dir = write_dir or model_dir
        self.checkpoint = tf.train.Checkpoint(model=model, **trackables)
        self.latest = tf.train.CheckpointManager(self.checkpoint, write_dir, max_to_keep=max_to_keep)
        self.best = tf.train.CheckpointManager(self.checkpoint, os.path.join(write_dir, BEST_DIR), max_to_keep=1)
        self.best_dir = os.path.join(model_dir, BEST_DIR)
        self._checked_at: int | None = None

    @property
    def best_json(self) -> str:
        return os.path.join(self.best_dir, "best.json")

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint in model_dir (the chief's)."""
        return tf.train.latest_checkpoint(self.model_dir)

    def restore_latest(self) -> str | None:
        """Restores the latest checkpoint, if any, with optimizer state; returns its path.

        Raises:
          SegtrainError: the checkpoint was written by a different model or optimizer.
        """
        path = self.latest_checkpoint
        if path:
            restore_checkpoint(self.checkpoint, path)
        return path

    def save(self, step: int) -> str:
        """Saves the latest checkpoint at ``step`` (weights checked first)."""
        self.check_weights(step)
        return self.latest.save(checkpoint_number=step)

    def save_best(self, step: int) -> str:
        self.check_weights(step)
        return self.best.save(checkpoint_number=step)

    def best_record(self) -> dict | None:
        """The best-checkpoint and early-stopping record, or None before the first evaluation."""
        return read_json(self.best_json) if os.path.exists(self.best_json) else None

    def write_record(self, record: dict) -> None:
        write_json(os.path.join(self.best.directory, "best.json"), record)

    def check_weights(self, step: int) -> None:
        """Refuses to save weights that are not finite (a step can overflow with a finite loss).

        The latest and the best checkpoint of one step share one check.

        Raises:
          SegtrainError: a weight is NaN or infinite; names the step and the checkpoint kept.
        """
        if self._checked_at == step:
            return
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in self.model.weights
                                if "float" in str(v.dtype)])
        if not bool(finite):
            raise SegtrainError(f"The model weights became NaN or infinite by step {step}. {self.kept()}")
        self._checked_at = step

    def kept(self) -> str:
        """What a failed run leaves: the last good checkpoint, and what to try."""
        latest = self.latest_checkpoint
        kept = (f"The last good checkpoint, {os.path.basename(latest)}, is intact; "
                if latest else "No checkpoint was written; ")
        return kept + "lower learning_rate.base, set train.clip_norm, or check the data, then rerun."
