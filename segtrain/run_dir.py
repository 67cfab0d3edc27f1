"""The run directory: every file name in it, and its checkpoints (which are whole, which read,
what is wrong with the rest). Every other module asks this one where a run's files are.

    model_dir/operative_config.gin           every gin setting the run used (OPERATIVE_CONFIG)
    model_dir/checkpoint                     TensorFlow's state file: the latest checkpoints
    model_dir/ckpt-<step>.index              a checkpoint: its index (tensor names, shapes,
    model_dir/ckpt-<step>.data-<i>-of-<n>    offsets, CRC32C of each tensor) and data shards
    model_dir/best/                          the best checkpoint, its state file and best.json
    model_dir/damaged/ckpt-<step>/           checkpoints training found unreadable, moved aside
    model_dir/train/, eval/                  TensorBoard events (train/plugins/profile/: traces)
    model_dir/events.*.hparams               the run's HParams session
    model_dir/nan_restores.json              train.on_nan = 'restore': the restores so far
    model_dir/segtrain.lock                  while a job writes the directory: which process
    model_dir/eval_results_<split>.json      the last evaluation during training
    model_dir/eval_results.json              `segtrain evaluate` (the same layout)
    model_dir/confusion_matrix.png           `segtrain evaluate`'s picture
    model_dir/failures/                      `segtrain evaluate`'s failure views: worst images, reliability
    model_dir/evaluate/                      `segtrain evaluate`'s TensorBoard summaries
    model_dir/calibration.json               `segtrain evaluate --calibrate`: the fitted temperature
    model_dir/trackers.json                  train.trackers: the tracked runs' ids (MLflow, W&B)
    model_dir/explain/                       `segtrain explain`'s default output

A checkpoint is *complete* when its index reads and every data shard exists. It *reads* when
every tensor comes back with the checksum its index recorded: TensorFlow checks that on every
tensor a restore reads, so restoring is the check, and nothing is read twice. Which checkpoint
a command restores, and what to say when it does not read, is decided here.
"""

from __future__ import annotations

import glob
import os
import re

import tensorflow as tf

from segtrain.errors import SegtrainError, warn

BEST_DIR = "best"  # model_dir/best/ holds the best checkpoint and best.json
BEST_RECORD = "best.json"  # in best/: which checkpoint, its value, evaluations since it improved
STATE_FILE = "checkpoint"  # TensorFlow's name for the state file of a checkpoint directory
DAMAGED_DIR = "damaged"  # where training moves checkpoints it could not read
OPERATIVE_CONFIG = "operative_config.gin"
NAN_RECORD = "nan_restores.json"
LOCK_FILE = "segtrain.lock"
TRAIN_LOGS, EVAL_LOGS = "train", "eval"
HPARAMS_SUFFIX = ".hparams"  # events.out.tfevents.*.hparams in model_dir
RESULTS = "eval_results.json"
CALIBRATION = "calibration.json"  # `segtrain evaluate --calibrate`: the fitted temperature
FAILURES_DIR = "failures"  # `segtrain evaluate`: the worst images' panels, the reliability diagram
EVALUATE_LOGS = "evaluate"  # `segtrain evaluate`'s TensorBoard summaries
CONFUSION_PICTURE = "confusion_matrix.png"
EXPLAIN_DIR = "explain"


def require(model_dir: str | None) -> str:
    """``model_dir``, or the one message for a command run without it.

    Raises:
      SegtrainError: no --model_dir.
    """
    if not model_dir:
        raise SegtrainError("--model_dir is required: the run's directory (checkpoints, TensorBoard logs, its "
                            "configuration), e.g. --model_dir=runs/quickstart.")
    return model_dir


def in_run_results(split: str) -> str:
    """The file name of the last evaluation of ``split`` during training."""
    return f"eval_results_{split}.json"


class DamagedCheckpoint(SegtrainError):
    """A checkpoint whose files are missing, cut short or changed.

    Attributes:
      path: the checkpoint's prefix (``.../ckpt-<step>``).
      reason: what is wrong, in words.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"Checkpoint {path} cannot be read: {reason}.")
        self.path, self.reason = path, reason


def step_of(path: str) -> int:
    match = re.search(r"ckpt-(\d+)$", path)
    return int(match.group(1)) if match else -1


def shards(prefix: str) -> list[str]:
    return sorted(glob.glob(glob.escape(prefix) + ".data-?????-of-?????"))


def is_complete(prefix: str) -> bool:
    """Whether checkpoint ``prefix`` (``.../ckpt-<step>``) has its index and every data shard.

    TensorFlow moves the data shards into place before it writes the index, so an index that
    reads means the data is there too; the shards are still counted, in case of a hand-made
    copy that missed one.
    """
    return problem(prefix) is None


def problem(prefix: str) -> str | None:
    """What is wrong with the files of checkpoint ``prefix`` that shows without reading its data
    (a missing or unreadable index, a missing data shard), or None."""
    name = os.path.basename(prefix)
    index = prefix + ".index"
    if not os.path.exists(index):
        return f"its index file {name}.index is missing"
    if os.path.getsize(index) == 0:
        return f"its index file {name}.index is empty"
    try:
        tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        if "No such file" in str(e) or "Failed to find" in str(e):
            found = shards(prefix)
            return f"a data file is missing (found {len(found)}: {', '.join(os.path.basename(f) for f in found)})"
        return f"its index file {name}.index is damaged ({_first_line(e)})"
    found = shards(prefix)
    if not found:
        return f"its data file {_missing_shard(prefix) or name + '.data-*'} is missing"
    expected = int(found[0][-5:])
    names = {os.path.basename(f) for f in found}
    missing = [f"{name}.data-{i:05d}-of-{expected:05d}" for i in range(expected)
               if f"{name}.data-{i:05d}-of-{expected:05d}" not in names]
    if missing:
        return f"its data file{'s' * (len(missing) > 1)} {', '.join(missing)} {'are' if len(missing) > 1 else 'is'} missing"
    return None


def is_damage(error: BaseException) -> bool:
    """Whether ``error`` (raised by a restore) says the checkpoint's files are damaged, rather
    than that they hold another model."""
    text = str(error)
    if isinstance(error, IndexError):
        return "Read less bytes" in text
    if isinstance(error, tf.errors.OpError):
        return any(sign in text for sign in (
            "Checksum does not match", "No such file", "too short to be an sstable", "corrupted",
            "Read less bytes", "Data loss", "bad magic number", "truncated"))
    return False


def diagnose(prefix: str, error: BaseException) -> str:
    """What is wrong with checkpoint ``prefix``, from the error its restore raised."""
    missing = problem(prefix)
    if missing:
        return missing
    text = str(error)
    name = os.path.basename(prefix)
    files = shards(prefix)
    if "Read less bytes" in text or "truncated" in text:
        sizes = ", ".join(f"{os.path.basename(f)} ({os.path.getsize(f)} bytes)" for f in files)
        return f"its data is cut short: {sizes} hold{'s' * (len(files) == 1)} less than its index says (truncated)"
    checksum = re.search(r"shard (\d+) \((\d+) bytes\): Checksum does not match", text)
    if checksum:
        shard = files[int(checksum.group(1))] if int(checksum.group(1)) < len(files) else name
        return (f"a tensor of {checksum.group(2)} bytes in {os.path.basename(shard)} does not match the checksum its "
                f"index recorded (bytes changed on disk)")
    return f"{name} is damaged ({_first_line(error)})"


def reads(prefix: str) -> str | None:
    """Reads every tensor of checkpoint ``prefix`` (each checked against its checksum); returns
    what is wrong, or None when the whole checkpoint reads. For error messages and checks: a
    restore checks what it reads by itself."""
    missing = problem(prefix)
    if missing:
        return missing
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, IndexError, ValueError) as e:
        return diagnose(prefix, e)
    return None


def state(directory: str):
    """The state file's record (paths made absolute), or None without a usable one."""
    try:
        return tf.train.get_checkpoint_state(directory)
    except ValueError:  # empty or not a state file (TensorFlow logs and ignores one it cannot parse)
        return None


def state_unreadable(directory: str) -> bool:
    """Whether ``directory`` has a state file that names no checkpoint (empty or damaged)."""
    path = os.path.join(directory, STATE_FILE)
    return os.path.isfile(path) and state(directory) is None


def on_disk(directory: str) -> list[str]:
    """The checkpoints in ``directory`` that have an index file, newest step first."""
    found = glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index"))
    return sorted((f[: -len(".index")] for f in found), key=step_of, reverse=True)


def listed(directory: str) -> list[str]:
    """The checkpoints of ``directory``, newest first: those the state file lists, or, when it
    is unreadable, those on disk."""
    record = state(directory)
    if record is None:
        return on_disk(directory) if state_unreadable(directory) else []
    paths = [record.model_checkpoint_path, *reversed(record.all_model_checkpoint_paths)]
    return list(dict.fromkeys(p for p in paths if p))


def latest_complete(directory: str) -> str | None:
    """The newest complete checkpoint of ``directory`` (see ``listed``).

    Normally the state file's latest; an older one it lists if the latest lost files.
    """
    return next((path for path in listed(directory) if is_complete(path)), None)


def resolve(model_dir: str, checkpoint: str) -> str:
    """The checkpoint ``--checkpoint`` names: 'best' (the latest when no best was kept), 'latest',
    a checkpoint of the run by name ('ckpt-600', 'best/ckpt-400') or a path.

    Raises:
      SegtrainError: no such checkpoint, or no checkpoint at all.
    """
    if checkpoint in ("best", "latest"):
        best = listed(os.path.join(model_dir, BEST_DIR)) if checkpoint == "best" else []
        candidates = best[:1] or listed(model_dir)[:1]
        if not best and candidates and state_unreadable(model_dir):
            warn(f"{os.path.join(model_dir, STATE_FILE)} names no checkpoint (it is empty or damaged): the latest "
                 f"is taken to be {os.path.basename(candidates[0])}, the newest checkpoint on disk.")
        if not candidates:
            raise SegtrainError(
                f"No checkpoint in {model_dir}: train first with `segtrain train --model_dir={model_dir} ...`.")
        return candidates[0]
    for path in (os.path.join(model_dir, checkpoint), checkpoint):
        if os.path.exists(path + ".index") or shards(path):
            return path
    names = [os.path.relpath(p, model_dir) for p in
             on_disk(model_dir) + on_disk(os.path.join(model_dir, BEST_DIR))]
    raise SegtrainError(f"--checkpoint={checkpoint}: no such checkpoint. Use best, latest"
                        + (f", or one of {', '.join(names)}" if names else "") + ".")


def readable_others(model_dir: str, exclude: str) -> list[str]:
    """The checkpoints of the run (latest ones, then best/) other than ``exclude`` that read
    whole, as names for --checkpoint ('ckpt-600', 'best/ckpt-400'). Reads each one."""
    found = []
    for directory in (model_dir, os.path.join(model_dir, BEST_DIR)):
        for path in dict.fromkeys(listed(directory) + on_disk(directory)):
            if os.path.abspath(path) != os.path.abspath(exclude) and reads(path) is None:
                found.append(os.path.relpath(path, model_dir))
    return found


def move_aside(prefix: str, model_dir: str) -> str:
    """Moves the files of checkpoint ``prefix`` into model_dir/damaged/<name>/ (a new directory
    for every move: nothing is overwritten or deleted); returns that directory."""
    name = os.path.basename(prefix)
    target, n = os.path.join(model_dir, DAMAGED_DIR, name), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(model_dir, DAMAGED_DIR, f"{name}-{n}")
    os.makedirs(target)
    for path in glob.glob(glob.escape(prefix) + ".*"):
        os.replace(path, os.path.join(target, os.path.basename(path)))
    return target


def _missing_shard(prefix: str) -> str | None:
    """The name of the data file a read of checkpoint ``prefix`` misses (TensorFlow names it)."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in list(reader.get_variable_to_shape_map())[:1]:
            reader.get_tensor(name)
    except (tf.errors.OpError, IndexError, ValueError) as e:
        match = re.search(r"(\S+\.data-\d{5}-of-\d{5})", str(e))
        return os.path.basename(match.group(1)) if match else None
    return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]
