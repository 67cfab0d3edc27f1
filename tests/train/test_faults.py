"""Local faults: SIGKILL at any moment, a full or read-only disk, and two jobs on one model_dir.

The faults are real: SIGKILL sent to a real `segtrain train` process (at random moments, and
from inside it in the middle of a checkpoint save or of an evaluation), small tmpfs mounts that
fill up or turn read-only, and lock files held by live and dead processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from segtrain.errors import SegtrainError
from segtrain.runtime import lock as L
from tests.conftest import REPO, assert_user_error, event_steps, read_scalars, segtrain_main, tiny_flags
from tests.data import fabricate as F

# SIGKILLs the process at the n-th call of one function (FAULT=kind:n), then runs `segtrain`.
FAULTY = '''
import os, signal, sys

kind, n = os.environ["FAULT"].split(":")
n, calls = int(n), [0]


def kill_at_nth(fn, before=True):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and before:
            os.kill(os.getpid(), signal.SIGKILL)
        out = fn(*args, **kwargs)
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapper


if kind == "merge":  # a save wrote its data into ckpt-<step>_temp/ and has not merged it yet
    from tensorflow.python.checkpoint import functional_saver
    ops = functional_saver.gen_io_ops
    ops.merge_v2_checkpoints = kill_at_nth(ops.merge_v2_checkpoints)
elif kind == "eval":  # an evaluation ran its first batches and has not returned
    from segtrain.evaluation import Evaluator
    run = Evaluator.run

    def run_and_die(self, *args, **kwargs):
        self._run_chunk = kill_at_nth(self._run_chunk, before=False)
        return run(self, *args, **kwargs)
    Evaluator.run = run_and_die

from segtrain.cli import main
sys.exit(main(["segtrain", *sys.argv[1:]]))
'''

def _folder_run(tmp_path, *bindings: str) -> list[str]:
    """The tiny run on a small folder dataset (which a run sets up faster than the synthetic
    shapes), with ``bindings``."""
    raw = tmp_path / "raw"
    if not raw.exists():
        F.folder(str(raw), [f"img_{i:02d}" for i in range(24)], num_classes=3, size=(36, 40))
    return tiny_flags("train.dataset = 'folder'", f"datasets.folder.source_dir = '{raw}'",
                      "datasets.folder.num_classes = 3", "datasets.folder.split_ratios = (0.75, 0.25, 0.0)",
                      "train.eval_split = 'val'", "train.steps_per_loop = 1", "train.num_image_panels = 0",
                      *bindings)


def _kill_run(tmp_path) -> list[str]:
    """40 quick steps: a checkpoint every 2, evaluations at 10, 20, 30, 40."""
    return _folder_run(tmp_path, "train.num_steps = 40", "train.checkpoint_every = 2", "train.keep_checkpoints = 2",
                       "train.eval_every = 10")


def _latest_step(model_dir) -> int:
    """The step of the checkpoint the state file names, if its index is there (0: none)."""
    state = os.path.join(model_dir, "checkpoint")
    if not os.path.exists(state):
        return 0
    with open(state) as f:
        match = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', f.read(), re.MULTILINE)
    complete = match and os.path.exists(os.path.join(model_dir, f"ckpt-{match.group(1)}.index"))
    return int(match.group(1)) if complete else 0


def _start(tmp_path, model_dir, fault: str, log: str) -> subprocess.Popen:
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    with open(tmp_path / log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(script), "train", f"--model_dir={model_dir}", *_kill_run(tmp_path)],
            cwd=REPO, env=dict(os.environ, FAULT=fault, TF_CPP_MIN_LOG_LEVEL="2"), stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Reading folder from its raw files")
def test_sigkill_at_any_moment_leaves_a_run_that_resumes(tmp_path):
    """SIGKILL in a checkpoint save, in an evaluation, and at a random moment: every rerun resumes
    no earlier than the last checkpoint the state file named when the job died, removes what the
    killed job left, takes over its lock, and the run ends at num_steps with a working evaluate."""
    model_dir = tmp_path / "run"
    rng = random.Random(7)
    # The fault injected from inside, or None: a SIGKILL from here at a random moment.
    plan = ["merge:2", "eval:1", None]
    complete = 0  # the step of the checkpoint the state file named when the last job died
    stale_lock = leftovers = False  # what the last job left
    for i, fault in enumerate(plan):
        log = tmp_path / f"run{i}.log"
        proc = _start(tmp_path, model_dir, fault or "none:0", log.name)
        try:
            if fault is None:
                # A random moment: within seconds of the start, or soon after the next save.
                before, after_save = _latest_step(model_dir), rng.random() < 0.7
                deadline = time.monotonic() + 120  # a generous bound: does not hang
                while after_save and _latest_step(model_dir) == before and proc.poll() is None:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                time.sleep(rng.uniform(0, 0.6) if after_save else rng.uniform(1, 8))
                killed_at = _latest_step(model_dir)
                proc.kill()
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log.read_text()
        assert proc.returncode in (-signal.SIGKILL, 0), text[-3000:]
        resumed = re.search(r"Resuming .* from ckpt-(\d+) at step (\d+)", text)
        if resumed or "train step" in text:  # it got as far as restoring (and then training)
            assert (int(resumed.group(2)) if resumed else 0) >= complete, text[-3000:]
            assert not stale_lock or "Took over the lock of" in text, text[-3000:]
            assert not leftovers or f"Removed what interrupted writes left in {model_dir}: " in text, text[-3000:]
        complete = max(complete, killed_at if fault is None else _latest_step(model_dir))
        stale_lock = (model_dir / L.LOCK_FILE).exists()
        leftovers = model_dir.exists() and any(name.endswith("_temp") for name in os.listdir(model_dir))
        if fault == "merge:2":  # killed in the save at step 4, after the one at step 2
            assert leftovers and complete == 2, "the save was killed after writing its temporary files"
        if fault == "eval:1":  # killed in the evaluation at step 10, after the save there
            assert complete == 10 and "eval step 10" not in text, text[-3000:]

    finished = segtrain_main("train", f"--model_dir={model_dir}", *_kill_run(tmp_path))
    assert finished.returncode == 0, finished.stderr[-3000:]
    resumed = re.search(r"Resuming .* at step (\d+)", finished.stdout)
    assert resumed and int(resumed.group(1)) >= complete, finished.stdout[-3000:]
    assert not stale_lock or "Took over the lock of" in finished.stdout
    assert _latest_step(model_dir) == 40
    names = os.listdir(model_dir) + os.listdir(model_dir / "best")
    assert not [n for n in names if "_temp" in n or ".tmp" in n], names
    assert L.LOCK_FILE not in names
    assert json.loads((model_dir / "eval_results_val.json").read_text())["step"] == 40
    assert max(s for s, _ in read_scalars(str(model_dir / "train"))["loss"]) == 40
    evaluated = segtrain_main("evaluate", f"--model_dir={model_dir}", "--split=val")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]


# ---- full and read-only disks ----------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs directory of that size; unmounted at the end."""
    mounted = []

    def mount(size: str) -> str:
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}): the full and "
                        f"read-only disk cases need one")
        mounted.append(path)
        return str(path)

    try:
        yield mount
    finally:
        for path in mounted:
            if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _fill(directory: str) -> None:
    with open(os.path.join(directory, "filler"), "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def _after_first_save(monkeypatch, fault):
    """Runs ``fault()`` right after the run's first checkpoint save."""
    from segtrain.train.checkpoints import Checkpoints

    save = Checkpoints.save

    def save_then_fault(self, step):
        path = save(self, step)
        if not getattr(self, "_faulted", False):
            self._faulted = True
            fault()
        return path

    monkeypatch.setattr(Checkpoints, "save", save_then_fault)


DISK_RUN = ("train.num_steps = 4", "train.checkpoint_every = 2", "train.eval_every = 0")


def _assert_intact_at_2(model_dir: str) -> None:
    """ckpt-2 is what a rerun resumes from, and nothing of the failed save is left."""
    from segtrain.train.checkpoints import is_complete, latest_complete

    names = sorted(os.listdir(model_dir))
    assert latest_complete(model_dir) == os.path.join(model_dir, "ckpt-2") and is_complete(f"{model_dir}/ckpt-2")
    assert not [n for n in names if n.startswith("ckpt-4") or "_temp" in n or n.endswith(".tmp")], names


@pytest.mark.filterwarnings("ignore:Reading folder from its raw files")
def test_a_full_disk_stops_the_run_with_one_message(tmp_path, tmpfs, monkeypatch):
    model_dir = os.path.join(tmpfs("8m"), "run")
    _after_first_save(monkeypatch, lambda: _fill(os.path.dirname(model_dir)))
    failed = segtrain_main("train", f"--model_dir={model_dir}", *_folder_run(tmp_path, *DISK_RUN))
    assert_user_error(failed, f"checkpoint ckpt-4 in {model_dir}: No space left on device",
                      "The checkpoints saved before are intact (the latest is ckpt-2)", "run the same command again")
    _assert_intact_at_2(model_dir)
    assert not os.path.exists(os.path.join(model_dir, L.LOCK_FILE)), "released on the error"


def test_a_read_only_disk_stops_a_save_with_one_message(tmpfs):
    """Checkpoints on a disk that turns read-only after the first save (the checkpoints alone:
    a training run's open event files keep a tmpfs from being remounted read-only), then a run
    on a read-only disk, whose first write, the lock, fails."""
    import keras
    import tensorflow as tf

    from segtrain.train.checkpoints import Checkpoints

    mount = tmpfs("4m")
    model_dir = os.path.join(mount, "run")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    checkpoints = Checkpoints(model_dir, model, step=tf.Variable(0, dtype=tf.int64))
    checkpoints.save(2)
    subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
    with pytest.raises(SegtrainError) as failed:
        checkpoints.save(4)
    assert (f"Could not write the checkpoint ckpt-4 in {model_dir}: Read-only file system. The checkpoints saved "
            f"before are intact (the latest is ckpt-2). Free space in {model_dir} or make it writable, then run "
            f"the same command again to resume from it.") == str(failed.value)
    _assert_intact_at_2(model_dir)
    refused = segtrain_main("train", f"--model_dir={os.path.join(mount, 'other')}", *tiny_flags())
    assert_user_error(refused, f"Cannot write in {mount}/other (Read-only file system)")


# ---- one job per model_dir -------------------------------------------------------------------

def _lock_of(pid: int, **changes) -> dict:
    return {**L.this_process(), "pid": pid, "start_ticks": L.process_start_ticks(pid), "command": "sleep 60",
            **changes}


def test_a_model_dir_in_use_is_refused_and_a_dead_owner_is_taken_over(tmp_path, capsys):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    lock_file = model_dir / L.LOCK_FILE
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        lock_file.write_text(json.dumps(_lock_of(sleeper.pid)))
        refused = segtrain_main("train", f"--model_dir={model_dir}", *tiny_flags())
        assert_user_error(refused, f"{model_dir} is in use by another training job: pid {sleeper.pid} on host "
                                   f"{L.this_process()['host']}", "sleep 60", f"delete {lock_file}")
        assert json.loads(lock_file.read_text())["pid"] == sleeper.pid, "a live owner's lock stays"

        # The same pid, started at another time: the pid was reused, the lock is stale.
        lock_file.write_text(json.dumps(_lock_of(sleeper.pid, start_ticks=1)))
        with L.DirectoryLock(str(model_dir)):
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        assert "Took over the lock of" in capsys.readouterr().out and not lock_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()

    lock_file.write_text(json.dumps(_lock_of(sleeper.pid)))  # its process has ended
    with L.DirectoryLock(str(model_dir)):
        held = json.loads(lock_file.read_text())
        assert held["pid"] == os.getpid() and held["command"] and held["start_ticks"] == \
            L.process_start_ticks(os.getpid())
    assert f"no longer runs (pid {sleeper.pid} on host" in capsys.readouterr().out
    assert not lock_file.exists(), "released at the end"

    lock_file.write_text(json.dumps(_lock_of(sleeper.pid, host="elsewhere")))
    with pytest.raises(SegtrainError, match=r"pid \d+ on host elsewhere.*\(this machine cannot tell whether"):
        L.DirectoryLock(str(model_dir)).acquire()


def test_the_lock_is_released_when_training_fails(tmp_path):
    model_dir = tmp_path / "run"
    failed = segtrain_main("train", f"--model_dir={model_dir}", *tiny_flags("train.model = 'no_such_model'"))
    assert failed.returncode == 1 and "no_such_model" in failed.stderr
    assert model_dir.is_dir() and not (model_dir / L.LOCK_FILE).exists()


def test_killed_save_leftovers_are_removed_and_a_lost_latest_falls_back(tmp_path, capsys):
    """The repair of a run directory, on files as interrupted saves leave them, then the restore
    that skips a checkpoint whose index was cut short."""
    import keras
    import tensorflow as tf

    from segtrain.train import checkpoints as C

    model_dir = str(tmp_path / "run")
    v = tf.Variable(1.0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, v=v), model_dir, max_to_keep=3)
    for step in (2, 4, 6):
        manager.save(checkpoint_number=step)
    os.makedirs(f"{model_dir}/ckpt-8_temp")
    for name in ("checkpoint.tmp0123abcd", ".eval_results_validation.json.x1y2.tmp"):
        (tmp_path / "run" / name).touch()
    index = tmp_path / "run" / "ckpt-6.index"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])  # cut short while written
    C.repair(model_dir)
    out = capsys.readouterr().out
    assert (f"Removed what interrupted writes left in {model_dir}: .eval_results_validation.json.x1y2.tmp, "
            f"checkpoint.tmp0123abcd, ckpt-8_temp.") in out
    checkpoints = C.Checkpoints(model_dir, model, v=v)
    v.assign(0.0)
    assert checkpoints.restore_latest() == f"{model_dir}/ckpt-4"
    out = capsys.readouterr().out
    assert f"Checkpoint ckpt-6 of {model_dir} cannot be read: its index file ckpt-6.index is damaged" in out
    assert os.path.exists(f"{model_dir}/damaged/ckpt-6/ckpt-6.index"), "moved aside, not deleted"
    assert C.latest_complete(model_dir) == f"{model_dir}/ckpt-4"
    for name in ("ckpt-2.index", "ckpt-4.index"):
        os.remove(f"{model_dir}/{name}")
    with pytest.raises(SegtrainError, match=r"None of the checkpoints of .* reads \(ckpt-4: its index file "
                                            r"ckpt-4.index is missing; ckpt-2: its index file ckpt-2.index is missing\)"):
        C.Checkpoints(model_dir, model, v=v).restore_latest()


@pytest.mark.slow
def test_a_run_killed_in_its_final_evaluation_evaluates_when_rerun(trained_run, tmp_path, configure, capsys):
    from segtrain.train.trainer import train
    from tests.conftest import copy_run

    run = copy_run(trained_run, tmp_path / "run")
    os.remove(os.path.join(run, "eval_results_validation.json"))  # what a kill during that evaluation leaves
    configure()
    results = train(run)
    assert f"{run} is at step 6, but its final evaluation did not finish: evaluating it now." in capsys.readouterr().out
    written = json.load(open(os.path.join(run, "eval_results_validation.json")))
    assert written["step"] == 6 and written["mean_iou"] == pytest.approx(results["mean_iou"])
    configure()
    train(run)  # now complete: nothing to do
    assert "nothing to train" in capsys.readouterr().out
    steps = event_steps(os.path.join(run, "eval"))
    assert ("mean_iou", 6) in steps and len(steps) == len(set(steps)), "the evaluation at 6 is in TensorBoard once"


def test_a_resumed_run_leaves_one_value_per_step_in_tensorboard(trained_run, tmp_path, configure, capsys):
    """Killed after window 6's summaries, before its checkpoint: the rerun trains 4..6 again from
    ckpt-3, and TensorBoard shows each step once, the rerun's values."""
    from segtrain.train import checkpoints as C
    from segtrain.train.trainer import train
    from tests.conftest import copy_run

    run = copy_run(trained_run, tmp_path / "run")
    for name in os.listdir(run):
        if name.startswith("ckpt-6"):
            os.remove(os.path.join(run, name))
    C.repair(run)  # the state file names ckpt-3 again
    os.remove(os.path.join(run, "eval_results_validation.json"))
    before = event_steps(os.path.join(run, "train"))
    assert ("loss", 6) in before and ("config/operative_gin (text)", 0) in before
    configure()
    train(run)
    assert f"Resuming {run} from ckpt-3 at step 3" in capsys.readouterr().out
    for logdir in ("train", "eval"):
        steps = event_steps(os.path.join(run, logdir))
        duplicates = sorted({s for s in steps if steps.count(s) > 1})
        assert not duplicates, f"{logdir}: {duplicates}"
    train_steps = event_steps(os.path.join(run, "train"))
    assert ("loss", 6) in train_steps and ("config/operative_gin (text)", 3) in train_steps
    assert ("config/operative_gin (text)", 0) in train_steps, "the first start's config stays"
    losses = dict((step, value) for step, value in read_scalars(os.path.join(run, "train"))["loss"])
    assert set(losses) == {3, 6}


# ---- every other write on a full disk --------------------------------------------------------

def _no_leftovers(directory) -> None:
    left = [n for root, dirs, files in os.walk(directory) for n in dirs + files if n.endswith((".tmp", "_temp"))]
    assert not left, left


def test_every_other_write_on_a_full_disk_is_one_message_naming_the_path(tmpfs, monkeypatch):
    """Results, the operative config, the NaN record, HParams and TensorBoard events: one
    message naming the path, and nothing half-written."""
    import gin
    import tensorflow as tf

    from segtrain.evaluation import write_results
    from segtrain.io import WriteError, write_json
    from segtrain.train import actions as A
    from segtrain.train import summaries as S
    from segtrain.train.hparams import HParams

    mount = tmpfs("1m")
    _fill(mount)
    monkeypatch.setattr(gin, "operative_config_str", lambda: "train.num_steps = 6\n" * 100)
    writes = {
        "eval_results_validation.json": lambda path: write_results(path, {"loss": 1.0}),
        "nan_restores.json": lambda path: write_json(path, {"restores": []}),
        "operative_config.gin": lambda path: A.WriteConfig(os.path.dirname(path),
                                                           tf.summary.create_noop_writer()).start(0),
    }
    for name, write in writes.items():
        path = os.path.join(mount, "run", name)
        with pytest.raises(WriteError) as failed:
            write(path)
        assert str(failed.value).startswith(f"Could not write {path}: No space left on device. Nothing was left "
                                            f"half-written. Free space in {mount}/run or make it writable")
    for what, write in (("hparams", lambda d: HParams(d).start(0)), ("train", S.file_writer)):
        logdir = os.path.join(mount, "run", what)
        os.makedirs(logdir, exist_ok=True)
        with pytest.raises(WriteError) as failed:
            write(logdir)
        assert str(failed.value).startswith(f"Could not write TensorBoard events in {logdir}: No space left on device")
        assert os.listdir(logdir) == [], "the empty events file TensorFlow left is removed"
    _no_leftovers(mount)


def test_evaluate_predict_and_export_on_a_full_disk(trained_run, tmp_path, tmpfs):
    from segtrain.images import write_image
    from tests.conftest import copy_run

    mount = tmpfs("16m")
    run = copy_run(trained_run, os.path.join(mount, "run"))
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    write_image(str(image), __import__("numpy").zeros((20, 24, 3), "uint8"))
    _fill(mount)
    evaluated = segtrain_main("evaluate", f"--model_dir={run}", "--split=validation")
    assert_user_error(evaluated, f"Could not write {run}/eval_results.json: No space left on device")
    predicted = segtrain_main("predict", f"--model_dir={run}", f"--input={image}", f"--output={mount}/out")
    assert_user_error(predicted, f"Could not write {mount}/out/a.png: No space left on device")
    exported = segtrain_main("export", f"--model_dir={run}", f"--output={mount}/export/1")
    assert_user_error(exported, f"Could not write the export {mount}/export/1: No space left on device")
    assert not os.path.exists(f"{mount}/export/1")
    _no_leftovers(mount)
