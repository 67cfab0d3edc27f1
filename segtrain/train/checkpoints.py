"""Checkpoints in model_dir: the latest few for resuming, and the best one by a metric.

    model_dir/ckpt-<step>.*        latest checkpoints (tf.train.CheckpointManager)
    model_dir/checkpoint           which of them is the latest (TensorFlow's state file)
    model_dir/best/ckpt-<step>.*   the best checkpoint so far
    model_dir/best/best.json       {"metric": ..., "value": ..., "step": ...}

TensorFlow writes a checkpoint's data into ``ckpt-<step>_temp/``, merges it into
``ckpt-<step>.index`` and ``.data-*`` files, and only then names it in the state file (written
through a temporary file and a rename); best.json is written the same way. So a run killed at
any moment leaves the state file naming a complete checkpoint, plus perhaps the leftovers of the
save it interrupted. The writer of a run directory removes those leftovers when it starts (see
``repair``), and a save that fails (a full or read-only disk) removes its own and stops with
one message: the checkpoints saved before it stay intact.
Weights that are not finite are never saved: the last good checkpoint stays the latest.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

import keras
import tensorflow as tf

from segtrain.errors import SegtrainError
from segtrain.experiment import restore_checkpoint
from segtrain.io import WriteError, atomic_write_text, os_reason, read_json, write_json
from segtrain.run_dir import (BEST_DIR, BEST_RECORD, STATE_FILE, DamagedCheckpoint, is_complete, latest_complete,
                              listed, move_aside, on_disk, problem, state_unreadable)
from segtrain.run_dir import state as _state


class Checkpoints:
    """Saves and restores the trackables of a training run (model, optimizer, step).

    Args:
      model_dir: the run's directory.
      model: the model; its weights are checked before every save.
      max_to_keep: how many of the latest checkpoints to keep.
      write_dir: where this process saves (default model_dir). Multi-worker runs restore from
        the chief's model_dir on every worker, while the other workers save to scratch
        directories: each must take part in a save, but only the chief's is kept. The
        process that writes model_dir repairs it first (``repair``).
      on_damaged: what a latest checkpoint that does not read does to ``restore_latest``:
        'fallback' (the newest one that reads, the others moved aside) or 'stop'.
      **trackables: the other objects to checkpoint, e.g. optimizer=..., step=....
    """

    def __init__(self, model_dir: str, model: keras.Model, max_to_keep: int = 3, write_dir: str | None = None,
                 on_damaged: str = "fallback", **trackables):
        self.model_dir = model_dir
        self.model = model
        self.write_dir = write_dir or model_dir
        self.writes_model_dir = self.write_dir == model_dir
        self.on_damaged, self.max_to_keep = on_damaged, max_to_keep
        self.best_dir = os.path.join(model_dir, BEST_DIR)
        if self.writes_model_dir:  # before the managers read the state files
            repair(model_dir)
        self.checkpoint = tf.train.Checkpoint(model=model, **trackables)
        self._managers()
        self._checked_at: int | None = None

    def _managers(self) -> None:
        """The managers of the latest and the best checkpoint (they read the state files)."""
        self.latest = tf.train.CheckpointManager(self.checkpoint, self.write_dir, max_to_keep=self.max_to_keep)
        self.best = tf.train.CheckpointManager(self.checkpoint, os.path.join(self.write_dir, BEST_DIR), max_to_keep=1)

    @property
    def best_json(self) -> str:
        return os.path.join(self.best_dir, BEST_RECORD)

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest complete checkpoint in model_dir (the chief's)."""
        return latest_complete(self.model_dir)

    def restore_latest(self) -> str | None:
        """Restores the newest checkpoint that reads, with optimizer state; returns its path.

        A checkpoint that does not read (its files cut short, changed or missing: TensorFlow
        checks every tensor's checksum as it restores) is skipped with a message; the process
        that writes model_dir moves its files to model_dir/damaged/ and drops it from the state
        file, so the next start does not trip on it. The latest checkpoints are tried newest
        first, then the best one. With ``on_damaged='stop'`` the first that does not read stops
        the run instead.

        Raises:
          SegtrainError: the checkpoint was written by a different model or optimizer; none of
            the run's checkpoints reads; or one does not read and on_damaged is 'stop'.
        """
        candidates = listed(self.model_dir) + listed(self.best_dir)[:1]
        skipped = []
        for path in dict.fromkeys(candidates):
            try:
                restore_checkpoint(self.checkpoint, path)
            except DamagedCheckpoint as e:
                if self.on_damaged == "stop":
                    raise SegtrainError(f"{e} train.on_damaged_checkpoint = 'stop', so the run stops here; set it to "
                                        f"'fallback' to resume from the newest checkpoint that reads.") from None
                skipped.append(self._set_aside(e))
                continue
            if skipped:
                self._forget(skipped)
                print(f"Resuming from {os.path.relpath(path, self.model_dir)}, the newest checkpoint that reads.",
                      flush=True)
            return path
        if skipped:
            self._forget(skipped)
            raise SegtrainError(
                f"None of the checkpoints of {self.model_dir} reads ({'; '.join(skipped)}). Restore them from a "
                f"copy, or train from step 0 in a new --model_dir; nothing starts from scratch here by itself.")
        return None

    def _set_aside(self, damaged: DamagedCheckpoint) -> str:
        """Says that ``damaged`` is skipped (and, writing model_dir, moves its files aside)."""
        name = os.path.relpath(damaged.path, self.model_dir)
        where = ""
        if self.writes_model_dir:
            where = f"; its files are now in {move_aside(damaged.path, self.model_dir)}"
        print(f"Checkpoint {name} of {self.model_dir} cannot be read: {damaged.reason}{where}.", flush=True)
        return f"{name}: {damaged.reason}"

    def _forget(self, skipped: list[str]) -> None:
        """The state files list only checkpoints that are still there; the managers reread them."""
        if not self.writes_model_dir:
            return
        for directory in (self.model_dir, self.best_dir):
            kept = [p for p in listed(directory) if is_complete(p)]
            if not kept and os.path.exists(os.path.join(directory, STATE_FILE)):
                os.remove(os.path.join(directory, STATE_FILE))
            elif kept:
                _write_listing(directory, list(reversed(kept)))
        self._managers()

    def save(self, step: int) -> str:
        """Saves the latest checkpoint at ``step`` (weights checked first).

        Raises:
          SegtrainError: the weights are not finite, or the checkpoint cannot be written.
        """
        self.check_weights(step)
        return self._save(self.latest, step, "checkpoint")

    def save_best(self, step: int) -> str:
        self.check_weights(step)
        return self._save(self.best, step, "best checkpoint")

    def _save(self, manager: tf.train.CheckpointManager, step: int, what: str) -> str:
        try:
            return manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            directory = manager.directory
            remove_unfinished(directory, f"ckpt-{step}")
            raise SegtrainError(f"Could not write the {what} ckpt-{step} in {directory}: {os_reason(e)}. "
                                f"{self.intact()}") from None

    def best_record(self) -> dict | None:
        """The best-checkpoint and early-stopping record, or None before the first evaluation."""
        return read_json(self.best_json) if os.path.exists(self.best_json) else None

    def write_record(self, record: dict) -> None:
        path = os.path.join(self.best.directory, BEST_RECORD)
        try:
            write_json(path, record)
        except WriteError as e:
            raise SegtrainError(f"Could not write {path}: {e.reason}. {self.intact()}") from None

    def intact(self) -> str:
        """What a failed write leaves, and how to go on."""
        latest = self.latest_checkpoint
        if not latest:
            return f"No checkpoint was saved before. Free space in {self.model_dir} or make it writable, then rerun."
        return (f"The checkpoints saved before are intact (the latest is {os.path.basename(latest)}). Free space "
                f"in {self.model_dir} or make it writable, then run the same command again to resume from it.")

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


def _leftovers(directory: str) -> list[str]:
    """What interrupted writes leave: TensorFlow's ``ckpt-<step>_temp/`` directories and
    ``checkpoint.tmp<hex>`` files, and the ``.<name>.<random>.tmp`` files of segtrain.io."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory)
                  if re.fullmatch(r"ckpt-\d+_temp|checkpoint\.tmp[0-9a-f]+|\..+\.tmp", name))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def remove_unfinished(directory: str, name: str) -> None:
    """After a failed save of ``name``: its leftovers, and its files unless the state file names
    it (best effort: on a read-only disk nothing was written either)."""
    for leftover in _leftovers(directory):
        _remove(os.path.join(directory, leftover))
    state = _state(directory)
    recorded = {os.path.basename(p) for p in state.all_model_checkpoint_paths} if state else set()
    if name not in recorded:
        for path in glob.glob(os.path.join(glob.escape(directory), glob.escape(name) + ".*")):
            _remove(path)


def repair(model_dir: str) -> None:
    """Makes a run directory that a killed job left safe to resume from, and says what it did.

    Called by the one process that writes ``model_dir``, before anything reads its checkpoints.

    - Removes the leftovers of interrupted saves (see ``_leftovers``), in model_dir and best/.
    - An empty or damaged state file (TensorFlow would start from step 0 without a word) is
      written anew from the checkpoints on disk. Which of them reads is ``restore_latest``'s to
      find out.
    - A best checkpoint left incomplete (a save over it interrupted, or files lost) is moved
      with its record to model_dir/damaged/, and the next evaluation chooses the best again; other checkpoints in best/ (saves that
      were never recorded) are removed, and a best.json that still describes the previous best
      is made to name the best checkpoint.
    """
    best_dir = os.path.join(model_dir, BEST_DIR)
    for directory in (model_dir, best_dir):
        found = _leftovers(directory)
        for name in found:
            _remove(os.path.join(directory, name))
        if found:
            print(f"Removed what interrupted writes left in {directory}: {', '.join(found)}.", flush=True)

    if state_unreadable(model_dir):
        found = on_disk(model_dir)
        if found:
            _write_listing(model_dir, list(reversed(found)))
            print(f"{os.path.join(model_dir, STATE_FILE)} was empty or damaged: it now lists the checkpoints on disk, "
                  f"{', '.join(os.path.basename(p) for p in reversed(found))}.", flush=True)
        else:
            os.remove(os.path.join(model_dir, STATE_FILE))
            print(f"{os.path.join(model_dir, STATE_FILE)} was empty or damaged and no checkpoint is on disk: removed "
                  f"it.", flush=True)

    best = _state(best_dir)
    if best is None:
        return
    name = os.path.basename(best.model_checkpoint_path)
    files = glob.glob(os.path.join(glob.escape(best_dir), "ckpt-*"))
    why = problem(best.model_checkpoint_path)
    if why:  # a save over it was interrupted, or its files were damaged
        target = move_aside(best.model_checkpoint_path, model_dir)
        for path in (os.path.join(best_dir, BEST_RECORD), os.path.join(best_dir, STATE_FILE)):
            if os.path.exists(path):
                os.replace(path, os.path.join(target, os.path.basename(path)))
        print(f"The best checkpoint {name} in {best_dir} is incomplete ({why}): moved it and best.json to "
              f"{target}; the next evaluation chooses the best checkpoint again.", flush=True)
        return
    # best/ keeps one checkpoint: any other is a save that was interrupted before it was recorded.
    unrecorded = sorted(os.path.basename(f) for f in files if not os.path.basename(f).startswith(name + "."))
    for other in unrecorded:
        _remove(os.path.join(best_dir, other))
    if unrecorded:
        print(f"Removed what interrupted writes left in {best_dir}: {', '.join(unrecorded)}.", flush=True)
    # KeepBest saves the checkpoint, then best.json: a stop between the two leaves the record of
    # the previous best. The checkpoint was saved because it improved on that record's value.
    record_path = os.path.join(best_dir, BEST_RECORD)
    record = read_json(record_path) if os.path.exists(record_path) else None
    if record is not None and record.get("path") and record["path"] != name:
        write_json(record_path, {**record, "step": int(name.rsplit("-", 1)[1]), "path": name,
                                 "evaluations_without_improvement": 0})
        print(f"{record_path} described {record.get('path')}, but the best checkpoint is {name} (the run "
              f"stopped between saving it and recording it): it now names {name}, with the value of "
              f"{record.get('path')} as the one to beat.", flush=True)


def _write_listing(directory: str, paths: list[str]) -> None:
    """A state file listing ``paths`` (oldest first), the last as the latest, with the times
    CheckpointManager needs to keep managing them (their index files' times)."""
    times = [os.path.getmtime(p + ".index") if os.path.exists(p + ".index") else 0.0 for p in paths]
    lines = [f'model_checkpoint_path: "{os.path.basename(paths[-1])}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in paths]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in times]
    lines.append(f"last_preserved_timestamp: {min(times) - 1.0!r}")
    atomic_write_text(os.path.join(directory, STATE_FILE), "\n".join(lines) + "\n")
