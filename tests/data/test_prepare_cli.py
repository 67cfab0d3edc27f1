"""`segtrain prepare` end to end: worker processes, bad input, chosen splits, gin settings, then
training on the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from segtrain.errors import SegtrainError
from tests.conftest import REPO, segtrain_cli, segtrain_main, tiny_flags
from tests.data import fabricate as F


@pytest.mark.slow
def test_prepare_then_train_on_two_replicas(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    trainval = [f"cat_{i}" for i in range(8)]
    F.pets(str(raw), {"trainval": trainval, "test": ["dog_1", "dog_2", "dog_3"]}, size=(40, 44))
    (raw / "images" / "cat_3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    args = ["prepare", "--dataset=oxford_iiit_pet", f"--source_dir={raw}", f"--data_dir={out}"]

    # In this process (the worker pool's processes are fresh ones all the same); the training
    # below needs one of its own for its logical devices.
    failed = segtrain_main(*args, "--num_workers=2")
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "error: oxford_iiit_pet in" in failed.stderr and "cat_3.jpg: corrupt or truncated image" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not (out / "oxford_iiit_pet" / "1.0.0").exists()

    done = segtrain_main(*args, "--num_workers=1", "--skip_bad_examples")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prepare trainval image 8/8" in done.stdout and "img/s" in done.stdout
    assert "Skipped 1 bad example(s)" in done.stdout and "trainval 7, test 3 examples" in done.stdout

    model_dir = tmp_path / "run"
    trained = segtrain_cli("train", f"--model_dir={model_dir}", "--cpu_replicas=2", *tiny_flags(
        "train.dataset = 'oxford_iiit_pet'", f"datasets.oxford_iiit_pet.data_dir = '{out}'",
        "train.train_split = 'trainval'", "train.eval_split = 'test'", "pipeline.resize = (36, 36)",
    ))
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = json.loads((model_dir / "eval_results_test.json").read_text())
    assert 0.0 <= results["mean_iou"] <= 1.0 and len(results["per_class_iou"]) == 3


def test_prepare_only_the_splits_asked_for(tmp_path):
    """Many users download Cityscapes' train and val only."""
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    F.cityscapes(str(raw), {"train": ["aachen_000000_000019", "bochum_000000_000313"],
                            "val": ["frankfurt_000000_000294"]})
    args = ["prepare", "--dataset=cityscapes", f"--source_dir={raw}", f"--data_dir={out}", "--num_workers=1"]
    refused = segtrain_main(*args)
    assert refused.returncode == 1 and "leftImg8bit/test for split 'test' does not exist" in refused.stderr
    done = segtrain_main(*args, "--splits=train,val")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Prepared cityscapes in" in done.stdout and "train 2, val 1 examples. Not prepared: test (--splits)." \
        in done.stdout
    again = segtrain_main(*args, "--splits=train,val")
    assert "already prepared in" in again.stdout and "(splits train, val)" in again.stdout
    unknown = segtrain_main(*args, "--splits=train,testing", "--overwrite")
    assert unknown.returncode == 1 and "--splits: dataset 'cityscapes' has no split 'testing'; it has train, val, test" \
        in unknown.stderr
    from registry import DATASETS

    with pytest.raises(SegtrainError, match=r"has no split 'test'; it has train, val\. To add it, run `segtrain "
                                            r"prepare --dataset=cityscapes` again with --overwrite"):
        DATASETS.original("cityscapes")("test", data_dir=str(out))


def test_prepare_takes_the_dataset_settings_from_gin(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    F.folder(str(raw), [f"img_{i}" for i in range(6)], num_classes=2)
    gin_file = tmp_path / "mine.gin"
    gin_file.write_text("datasets.folder.num_classes = 2\ndatasets.folder.class_names = ('sky', 'tree')\n"
                        "datasets.folder.splits = ('train',)\ndatasets.folder.split_ratios = (1.0,)\n"
                        f"datasets.folder.source_dir = '{raw}'\n")
    done = segtrain_main("prepare", "--dataset=folder", f"--gin_file={gin_file}", f"--data_dir={out}",
                         "--num_workers=1")
    assert done.returncode == 0, done.stderr[-2000:]
    from registry import DATASETS

    _, info = DATASETS.original("folder")("train", data_dir=str(out))
    assert info.class_names == ("sky", "tree") and info.num_examples == {"train": 6}
    shapes = segtrain_main("prepare", "--dataset=shapes", f"--data_dir={out}")
    assert shapes.returncode == 1 and "Dataset 'shapes' has no raw files to prepare; preparable datasets: " in shapes.stderr
    listed = shapes.stderr.split("preparable datasets: ")[1].strip().rstrip(".").split(", ")
    # Other tests may register more preparable datasets in this process; the built-in ones are all there.
    assert {"ade20k", "cityscapes", "coco_stuff", "drive", "folder", "oxford_iiit_pet", "voc2012", "voc2012_aug"} <= set(listed) and "shapes" not in listed


# `segtrain prepare`, SIGKILLed by itself in the middle of its second split.
KILLED_MID_PREPARE = """
import functools, os, signal, sys

if __name__ == "__main__":  # the spawned workers import this file too
    import segtrain.data.prepare as prepare

    def kill_in_the_test_split(split, done):
        if split == "test" and done == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    prepare.after_example = kill_in_the_test_split
    from segtrain.cli import main
    sys.exit(main(["segtrain", *sys.argv[1:]]))
"""


def _pets(tmp_path):
    raw = tmp_path / "raw"
    F.pets(str(raw), {"trainval": [f"cat_{i}" for i in range(6)], "test": ["dog_1", "dog_2", "dog_3"]}, size=(40, 44))
    return raw


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # the process is gone
        return b""


def _processes(tag: str) -> list[int]:
    """Live processes whose environment holds ``tag``."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and tag.encode() in _read(f"/proc/{p}/environ")]


def _workers(parent: int) -> list[int]:
    """The pool worker processes that ``parent`` spawned."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and _read(f"/proc/{p}/stat").rsplit(b")", 1)[-1].split()[1:2] == [str(parent).encode()]
            and b"spawn_main" in _read(f"/proc/{p}/cmdline")]


@pytest.mark.slow
def test_a_killed_prepare_leaves_nothing_prepared_and_the_next_run_cleans_up(tmp_path):
    from registry import DATASETS
    from segtrain.data import pets
    from segtrain.data.prepare import is_prepared, unfinished

    raw, out = _pets(tmp_path), tmp_path / "prepared"
    args = ["prepare", "--dataset=oxford_iiit_pet", f"--source_dir={raw}", f"--data_dir={out}"]
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_PREPARE)
    tag = f"SEGTRAIN_TEST_TAG={uuid.uuid4().hex}"
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.run([sys.executable, str(script), *args, "--num_workers=2"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, timeout=300, check=False,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", SEGTRAIN_TEST_TAG=tag[17:]))
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    deadline = time.monotonic() + 30  # a generous bound for "its worker processes end too"
    while _processes(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes(tag), "the workers of a killed prepare must not outlive it"

    source = pets.OxfordIiitPet()
    left = unfinished(str(out), source)
    assert not is_prepared(str(out), source) and len(left) == 1 and os.listdir(left[0])
    with pytest.raises(SegtrainError, match=r"an earlier `segtrain prepare` did not finish; run `segtrain prepare"):
        DATASETS.original("oxford_iiit_pet")("trainval", data_dir=str(out))

    again = segtrain_main(*args, "--num_workers=1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Took over the lock of {out / 'oxford_iiit_pet'} from a `segtrain prepare` job that no longer runs" \
        in again.stdout
    assert f"Removed {left[0]}: left by an earlier `segtrain prepare` of oxford_iiit_pet that did not finish." \
        in again.stdout
    assert is_prepared(str(out), source) and not unfinished(str(out), source)
    assert sorted(os.listdir(out / "oxford_iiit_pet")) == ["1.0.0"], "the lock is released"


@pytest.mark.slow
def test_a_worker_killed_mid_prepare_is_one_message_and_nothing_is_written(tmp_path, monkeypatch):
    from segtrain.data import pets
    from segtrain.data import prepare as module
    from segtrain.data.prepare import is_prepared, prepare, unfinished

    raw, out = _pets(tmp_path), tmp_path / "prepared"

    def kill_a_worker(split, done):  # between the two splits: the next one finds the pool broken
        if split == "trainval" and done == 6:
            # Every worker: a worker killed while idle loses no work, and the one left could
            # finish the next split before the pool notices the death (a race on a loaded machine).
            workers = _workers(os.getpid())
            assert workers
            for pid in workers:
                os.kill(pid, signal.SIGKILL)

    monkeypatch.setattr(module, "after_example", kill_a_worker)
    with pytest.raises(SegtrainError, match=r"^A worker process of `segtrain prepare` died \(it was killed: out of "
                                            r"memory\?\)\. Nothing was written to .*Run again, with fewer "
                                            r"--num_workers \(now 2\)"):
        prepare(pets.OxfordIiitPet(), str(raw), str(out), num_workers=2)
    assert not is_prepared(str(out), pets.OxfordIiitPet()) and not unfinished(str(out), pets.OxfordIiitPet())


def test_a_small_dataset_is_decoded_in_one_process_unless_workers_are_asked_for(monkeypatch):
    """A worker process starts by importing TensorFlow (seconds): without --num_workers, one per
    EXAMPLES_PER_WORKER examples at most, and never more than the cores."""
    from segtrain.data import prepare as P

    monkeypatch.setattr(P.os, "cpu_count", lambda: 8)
    per = P.EXAMPLES_PER_WORKER
    assert [P.default_workers(n) for n in (1, per, per + 1, 3 * per, 100 * per)] == [1, 1, 2, 3, 8]
    monkeypatch.setattr(P.os, "cpu_count", lambda: None)
    assert P.default_workers(100 * per) == 1
