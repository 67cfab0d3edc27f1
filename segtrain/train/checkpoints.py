"""Checkpoints in model_dir: the latest few for resuming, and the best one by a metric.

    model_dir/ckpt-<step>.*        latest checkpoints (tf.train.CheckpointManager)
    model_dir/best/ckpt-<step>.*   the best checkpoint so far
    model_dir/best/best.json       {"metric": ..., "value": ..., "step": ...}

TensorFlow writes checkpoint data under temporary names and renames it, and best.json is
written the same way, so an interrupted save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import os

import tensorflow as tf

from segtrain.errors import SegtrainError
from segtrain.io import read_json, write_json


class Checkpoints:
    """Saves and restores the trackables of a run (model, optimizer, step).

    Args:
      model_dir: the run's directory.
      max_to_keep: how many of the latest checkpoints to keep.
      write_dir: where this process saves (default model_dir). Multi-worker runs restore from
        the chief's model_dir on every worker, while the other workers save to scratch
        directories: each must take part in a save, but only the chief's is kept.
      **trackables: objects to checkpoint, e.g. model=..., optimizer=..., step=....
    """

    def __init__(self, model_dir: str, max_to_keep: int = 3, write_dir: str | None = None, **trackables):
        self.model_dir = model_dir
        write_dir = write_dir or model_dir
        self.checkpoint = tf.train.Checkpoint(**trackables)
        self.latest = tf.train.CheckpointManager(self.checkpoint, write_dir, max_to_keep=max_to_keep)
        self.best = tf.train.CheckpointManager(self.checkpoint, os.path.join(write_dir, "best"), max_to_keep=1)
        self.best_dir = os.path.join(model_dir, "best")

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
            self._restore(path, lambda status: status.assert_existing_objects_matched())
        return path

    def save(self, step: int) -> str:
        return self.latest.save(checkpoint_number=step)

    def best_record(self) -> dict | None:
        """The best-checkpoint and early-stopping record, or None before the first evaluation."""
        return read_json(self.best_json) if os.path.exists(self.best_json) else None

    def save_best(self, step: int) -> str:
        return self.best.save(checkpoint_number=step)

    def write_record(self, record: dict) -> None:
        write_json(os.path.join(self.best.directory, "best.json"), record)

    def restore_for_eval(self, which: str = "best") -> str:
        """Restores model weights from the 'best' (falling back to 'latest') or 'latest' checkpoint.

        Raises:
          SegtrainError: no checkpoint in model_dir, or one of a different model.
        """
        if which not in ("best", "latest"):
            raise SegtrainError(f"--checkpoint={which!r}: use 'best' or 'latest'.")
        path = (which == "best" and tf.train.latest_checkpoint(self.best_dir)) or self.latest_checkpoint
        if not path:
            raise SegtrainError(
                f"No checkpoint in {self.model_dir}: train first with "
                f"`segtrain train --model_dir={self.model_dir} ...`."
            )
        self._restore(path, lambda status: status.expect_partial())
        return path

    def _restore(self, path: str, check) -> None:
        try:
            check(self.checkpoint.restore(path))
        except (ValueError, AssertionError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SegtrainError(
                f"Checkpoint {path} does not fit the model and optimizer configured now: it was "
                f"written by a different model or configuration ({first[:300]}). Use a new "
                f"--model_dir, or the gin configuration the run was trained with "
                f"({self.model_dir}/operative_config.gin)."
            ) from None
