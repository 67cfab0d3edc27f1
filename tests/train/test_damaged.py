"""Damaged files on disk, injected for real: checkpoints cut short, changed or missing parts, and
prepared datasets with corrupted, truncated or missing shards. Each ends in one message or a
correct fallback, never a traceback, and nothing intact is removed."""

from __future__ import annotations

import os
import shutil

import pytest

from segtrain.errors import SegtrainError, SegtrainWarning
from tests.conftest import assert_user_error, copy_run, read_scalars, segtrain_main, tiny_flags
from tests.data import fabricate as F

DATA = "ckpt-6.data-00000-of-00001"


def _flip_everywhere(path: str) -> None:
    """Changes 8 bytes every 5000: every tensor larger than that has some changed."""
    data = bytearray(open(path, "rb").read())
    for start in range(0, len(data) - 8, 5000):
        for i in range(start, start + 8):
            data[i] ^= 0xFF
    open(path, "wb").write(data)


def _truncate(path: str, size: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


DAMAGE = {
    "truncated data file": (lambda run: _truncate(f"{run}/{DATA}"), "its data is cut short: " + DATA + " (100 bytes)"),
    "changed bytes": (lambda run: _flip_everywhere(f"{run}/{DATA}"), "does not match the checksum its index recorded"),
    "missing data shard": (lambda run: os.remove(f"{run}/{DATA}"), f"its data file {DATA} is missing"),
    "missing index": (lambda run: os.remove(f"{run}/ckpt-6.index"), "its index file ckpt-6.index is missing"),
    "empty index": (lambda run: open(f"{run}/ckpt-6.index", "w").close(), "its index file ckpt-6.index is empty"),
}


@pytest.fixture
def run(trained_run, tmp_path):
    """A private copy of the session's tiny run: ckpt-3 and ckpt-6, and best/ckpt-6."""
    return copy_run(trained_run, tmp_path / "run")


@pytest.mark.parametrize("kind", DAMAGE)
def test_evaluate_names_the_damage_and_the_checkpoints_that_read(run, kind):
    damage, reason = DAMAGE[kind]
    damage(run)
    failed = segtrain_main("evaluate", f"--model_dir={run}", "--checkpoint=latest", "--split=validation")
    error = assert_user_error(failed, f"Checkpoint {run}/ckpt-6 cannot be read: ", reason,
                              f"Checkpoints of {run} that read: ckpt-3 (--checkpoint=ckpt-3), best/ckpt-6 "
                              f"(--checkpoint=best/ckpt-6).")
    assert error.count("\n") == 0
    picked = segtrain_main("evaluate", f"--model_dir={run}", "--checkpoint=ckpt-3", "--split=validation")
    assert picked.returncode == 0 and "Evaluating ckpt-3 (step 3)" in picked.stdout, picked.stderr[-2000:]


def test_every_command_that_reads_a_checkpoint_says_the_same(run, tmp_path):
    _truncate(f"{run}/best/{DATA}")  # the best is damaged, the latest reads
    image = tmp_path / "a.png"
    from segtrain.images import write_image

    write_image(str(image), __import__("numpy").zeros((20, 24, 3), "uint8"))
    expected = (f"Checkpoint {run}/best/ckpt-6 cannot be read: its data is cut short",
                "Checkpoints of", "ckpt-6 (--checkpoint=ckpt-6), ckpt-3 (--checkpoint=ckpt-3).")
    assert_user_error(segtrain_main("export", f"--model_dir={run}", f"--output={tmp_path / 'export'}"), *expected)
    assert_user_error(segtrain_main("predict", f"--model_dir={run}", f"--input={image}",
                                    f"--output={tmp_path / 'out'}"), *expected)
    assert_user_error(segtrain_main("explain", f"--model_dir={run}", f"--input={image}", "--class=circle"), *expected)
    assert not (tmp_path / "export").exists() and not (tmp_path / "out").exists()


def test_a_name_that_is_no_checkpoint_lists_the_ones_there(run):
    assert_user_error(segtrain_main("evaluate", f"--model_dir={run}", "--checkpoint=ckpt-99"),
                      "--checkpoint=ckpt-99: no such checkpoint. Use best, latest, or one of ckpt-6, ckpt-3, best/ckpt-6.")


@pytest.mark.slow
def test_an_empty_state_file_falls_back_to_the_checkpoints_on_disk(run, configure, capsys):
    from segtrain.train.trainer import train

    open(f"{run}/checkpoint", "w").close()
    with pytest.warns(SegtrainWarning, match="checkpoint names no checkpoint .it is empty or damaged.: the latest "
                                             "is taken to be ckpt-6, the newest checkpoint on disk"):
        evaluated = segtrain_main("evaluate", f"--model_dir={run}", "--checkpoint=latest", "--split=validation")
    assert evaluated.returncode == 0 and "Evaluating ckpt-6 (step 6)" in evaluated.stdout
    configure("train.num_steps = 9")
    train(run)
    out = capsys.readouterr().out
    assert f"{run}/checkpoint was empty or damaged: it now lists the checkpoints on disk, ckpt-3, ckpt-6." in out
    assert f"Resuming {run} from ckpt-6 at step 6" in out and os.path.exists(f"{run}/ckpt-9.index")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated data file", "missing index"])
def test_training_resumes_from_the_newest_checkpoint_that_reads(run, configure, capsys, kind):
    from segtrain.train.checkpoints import latest_complete
    from segtrain.train.trainer import train

    damage, reason = DAMAGE[kind]
    damage(run)
    before = sorted(os.listdir(run))
    configure("train.num_steps = 9")
    train(run)
    out = capsys.readouterr().out
    assert f"Checkpoint ckpt-6 of {run} cannot be read: {reason}" in out
    assert f"its files are now in {run}/damaged/ckpt-6." in out
    assert "Resuming from ckpt-3, the newest checkpoint that reads." in out
    assert f"Resuming {run} from ckpt-3 at step 3" in out
    moved = sorted(os.listdir(f"{run}/damaged/ckpt-6"))
    assert moved == sorted(n for n in before if n.startswith("ckpt-6.")), "moved aside, never deleted"
    assert os.path.exists(f"{run}/ckpt-3.index"), "the intact one stays"
    assert latest_complete(run) == f"{run}/ckpt-9"
    configure("train.num_steps = 9")
    train(run)  # the next start does not trip on it again
    assert "cannot be read" not in capsys.readouterr().out


def test_on_damaged_checkpoint_stop_stops_and_moves_nothing(run, configure):
    from segtrain.train.trainer import train

    _truncate(f"{run}/{DATA}")
    configure("train.num_steps = 9", "train.on_damaged_checkpoint = 'stop'")
    with pytest.raises(SegtrainError) as stopped:
        train(run)
    assert str(stopped.value).startswith(f"Checkpoint {run}/ckpt-6 cannot be read: its data is cut short")
    assert "train.on_damaged_checkpoint = 'stop', so the run stops here" in str(stopped.value)
    assert os.path.exists(f"{run}/{DATA}") and not os.path.exists(f"{run}/damaged")


@pytest.mark.slow
def test_a_damaged_latest_falls_back_to_the_best_and_none_that_reads_stops(run, configure, capsys):
    from segtrain.train.trainer import train

    for name in ("ckpt-3", "ckpt-6"):
        _truncate(f"{run}/{name}.data-00000-of-00001")
    configure("train.num_steps = 7")
    train(run)
    assert "Resuming from best/ckpt-6, the newest checkpoint that reads." in capsys.readouterr().out
    # Now every checkpoint of another copy is damaged: one message, and no fresh start.
    other = copy_run(run, run + "-all")
    for directory in (other, f"{other}/best"):
        for name in os.listdir(directory):
            if ".data-" in name:
                _truncate(os.path.join(directory, name))
    configure("train.num_steps = 9")
    with pytest.raises(SegtrainError, match=rf"None of the checkpoints of {other} reads .* nothing starts from "
                                            rf"scratch here by itself"):
        train(other)
    assert not os.path.exists(f"{other}/ckpt-9.index")


# ---- damaged prepared data ---------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny prepared Oxford-IIIT Pet: trainval 12 examples, test 3, one shard each."""
    from segtrain.data import pets
    from segtrain.data.prepare import prepare

    root = tmp_path_factory.mktemp("pets")
    raw, out = root / "raw", root / "prepared"
    F.pets(str(raw), {"trainval": [f"cat_{i}" for i in range(12)], "test": ["dog_1", "dog_2", "dog_3"]},
           size=(40, 44))
    prepare(pets.OxfordIiitPet(), str(raw), str(out), num_workers=1)
    return out


def _shard(data_dir, split: str) -> str:
    return f"{data_dir}/oxford_iiit_pet/1.0.0/oxford_iiit_pet-{split}.tfrecord-00000-of-00001"


def _flip_middle(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    open(path, "wb").write(data)


DATA_DAMAGE = {
    "train shard changed": ("trainval", _flip_middle, "a record fails its checksum (bytes changed on disk)"),
    "eval shard changed": ("test", _flip_middle, "a record fails its checksum (bytes changed on disk)"),
    "train shard truncated": ("trainval", lambda p: _truncate(p, os.path.getsize(p) // 2),
                              "the file is cut short (truncated)"),
    "train shard missing": ("trainval", os.remove, "the file is missing"),
}


def _pets_flags(data_dir, *extra):
    return tiny_flags("train.dataset = 'oxford_iiit_pet'", f"datasets.oxford_iiit_pet.data_dir = '{data_dir}'",
                      "train.train_split = 'trainval'", "train.eval_split = 'test'", "pipeline.resize = (36, 36)",
                      "train.batch_size = 2", "train.num_image_panels = 0", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("kind", DATA_DAMAGE)
def test_damaged_prepared_data_is_one_message_naming_shard_offset_and_rebuild(prepared, tmp_path, kind):
    split, damage, reason = DATA_DAMAGE[kind]
    data_dir = tmp_path / "prepared"
    shutil.copytree(prepared, data_dir)
    damage(_shard(data_dir, split))
    failed = segtrain_main("train", f"--model_dir={tmp_path / 'run'}", *_pets_flags(data_dir))
    assert_user_error(failed, f"The prepared oxford_iiit_pet dataset in {data_dir}/oxford_iiit_pet/1.0.0 is damaged: "
                              f"split '{split}', oxford_iiit_pet-{split}.tfrecord-00000-of-00001", reason,
                      f"`segtrain prepare --dataset=oxford_iiit_pet --source_dir=RAW --data_dir={data_dir} --overwrite`")
    if kind != "train shard missing":
        assert " at byte " in failed.stderr
    verified = segtrain_main("prepare", "--dataset=oxford_iiit_pet", f"--data_dir={data_dir}", "--verify")
    assert verified.returncode == 1 and reason in verified.stderr
    assert f"{split}: 1 shard(s)" in verified.stdout and "damaged shard(s)" in verified.stdout


def test_verify_reads_an_intact_dataset(prepared):
    verified = segtrain_main("prepare", "--dataset=oxford_iiit_pet", f"--data_dir={prepared}", "--verify")
    assert verified.returncode == 0, verified.stderr
    assert "test: 1 shard(s), 3 records: ok" in verified.stdout and "trainval: 1 shard(s), 12 records: ok" in verified.stdout


@pytest.mark.slow
def test_skip_damaged_records_trains_without_them_and_counts_them(prepared, tmp_path):
    data_dir = tmp_path / "prepared"
    shutil.copytree(prepared, data_dir)
    _flip_middle(_shard(data_dir, "trainval"))
    model_dir = tmp_path / "run"
    with pytest.warns(SegtrainWarning, match="datasets.oxford_iiit_pet.skip_damaged_records: leaving out 7 "
                                             "record.s. of split 'trainval'"):
        trained = segtrain_main("train", f"--model_dir={model_dir}",
                                *_pets_flags(data_dir, "datasets.oxford_iiit_pet.skip_damaged_records = True"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert read_scalars(str(model_dir / "train"))["data/damaged_records_skipped"] == [(0, 7.0)]
    assert os.path.exists(model_dir / "ckpt-6.index")
    # `segtrain evaluate` on a damaged split, the skipping turned off: the same one message.
    _flip_middle(_shard(data_dir, "test"))
    failed = segtrain_main("evaluate", f"--model_dir={model_dir}", "--split=test",
                           "--gin_param=datasets.oxford_iiit_pet.skip_damaged_records = False")
    assert_user_error(failed, "is damaged: split 'test', oxford_iiit_pet-test.tfrecord-00000-of-00001 at byte ",
                      "a record fails its checksum")
