"""The tf.data service: training batches made by service workers, refused when they cannot be."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

from segtrain.data import service
from segtrain.data.info import DatasetInfo
from segtrain.data.pipeline import build_pipeline
from segtrain.errors import SegtrainError
from tests.conftest import REPO, wait_for_line



@contextlib.contextmanager
def _servers():
    """A dispatcher and one worker in this process, on free ports: (address, dispatcher, worker)."""
    dispatcher, port = service.start_dispatcher()
    worker, _ = service.start_worker(f"localhost:{port}")
    try:
        yield f"grpc://localhost:{port}", dispatcher, worker
    finally:
        gc.collect()  # a live iterator of a job keeps its task, and stop() waiting for it
        worker.stop()
        dispatcher.stop()


@pytest.fixture(scope="module")
def servers():
    with _servers() as running:
        yield running


INFO = DatasetInfo(num_classes=4, name="toy", num_examples={"train": 12})


def _pipeline(address=None, run=None):
    """The training pipeline over 12 tiny examples (cheap to build, unlike ``shapes``)."""
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensor_slices({"image": rng.integers(0, 256, (12, 12, 12, 3), np.uint8),
                                             "label": rng.integers(0, 4, (12, 12, 12), np.uint8)})
    return build_pipeline(ds, INFO, "train", True, 2, 1, 0, run=run, crop_size=(8, 8), deterministic=True,
                          data_service_address=address)


@pytest.fixture(scope="module")
def local():
    """The same pipeline read here: its first 12 batches (two epochs), keyed."""
    ds = _pipeline()
    return ds.element_spec, {_key(b) for b in _batches(ds, 12)}


def _batches(ds, n):
    it = iter(ds)
    return [{k: v.numpy() for k, v in next(it).items()} for _ in range(n)]


def _key(batch) -> bytes:
    return batch["image"].tobytes() + batch["label"].tobytes()


def test_the_training_pipeline_is_made_by_the_service_worker(servers, local):
    address, _, worker = servers
    tasks = worker._num_tasks()
    served = _pipeline(address, run="a")
    batches = _batches(served, 3)
    assert worker._num_tasks() == tasks + 1, "the worker should run the job's task"
    assert served.element_spec == local[0]
    for batch in batches:
        assert batch["image"].shape == (2, 8, 8, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (2, 8, 8) and batch["label"].dtype == np.int32
    # One worker reads the source splits in order: the same augmented examples as locally.
    assert {_key(b) for b in batches} <= local[1]


def test_two_trainers_of_one_job_get_different_batches(servers, local):
    address, _, _ = servers
    first, second = _pipeline(address, run="b"), _pipeline(address, run="b")
    keys_a, keys_b = {_key(x) for x in _batches(first, 3)}, {_key(x) for x in _batches(second, 3)}
    assert len(keys_a) == len(keys_b) == 3
    assert not keys_a & keys_b, "a shared job hands every batch to one trainer only"
    assert keys_a | keys_b <= local[1]


def test_job_names_separate_runs_batch_sizes_and_start_steps():
    name = service.job_name("shapes", "train", 8, 4, 100, "runs/x")
    assert name == service.job_name("shapes", "train", 8, 4, 100, "runs/x")
    others = {service.job_name("shapes", "train", 8, 4, 100, "runs/y"), service.job_name("shapes", "train", 16, 8, 100,
              "runs/x"), service.job_name("shapes", "train", 8, 2, 100, "runs/x"),
              service.job_name("shapes", "train", 8, 4, 110, "runs/x")}
    assert name not in others and len(others) == 4
    assert "batch8" in name and "seed100" in name


@pytest.mark.parametrize("kind", ["numpy_function", "py_function", "from_generator"])
def test_python_functions_are_found(kind):
    base = tf.data.Dataset.range(4)
    ds = {
        "numpy_function": lambda: base.map(lambda x: tf.numpy_function(lambda v: v, [x], tf.int64, stateful=False)),
        # nested in an interleaved dataset's function
        "py_function": lambda: base.interleave(
            lambda x: tf.data.Dataset.from_tensors(x).map(lambda y: tf.py_function(lambda v: v, [y], tf.int64))),
        "from_generator": lambda: tf.data.Dataset.from_generator(
            lambda: iter(range(3)), output_signature=tf.TensorSpec([], tf.int64)).batch(2),
    }[kind]()
    name = "Dataset.from_generator" if kind == "from_generator" else f"tf.{kind}"
    assert name in service.python_functions(ds)


def test_a_pure_tensorflow_pipeline_calls_no_python(local):
    assert service.python_functions(_pipeline()) == []


def test_a_pipeline_that_calls_python_is_refused_naming_the_flag_and_dataset():
    ds = tf.data.Dataset.from_tensor_slices({"image": tf.zeros([4, 8, 8, 3], tf.uint8),
                                             "label": tf.zeros([4, 8, 8], tf.uint8)})
    info = DatasetInfo(num_classes=2, name="mine", num_examples={"train": 4},
                       decode=lambda ex: {**ex, "label": tf.numpy_function(lambda v: v, [ex["label"]], tf.uint8)})
    with pytest.raises(SegtrainError) as e:
        build_pipeline(ds, info, "train", True, 2, 1, crop_size=(8, 8), data_service_address="grpc://localhost:1")
    message = str(e.value)
    for fragment in ("pipeline.data_service_address='grpc://localhost:1'", "dataset 'mine' split 'train'",
                     "tf.numpy_function", "segtrain prepare"):
        assert fragment in message, message


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_no_dispatcher_or_a_bad_address_is_one_clear_error():
    port = _closed_port()
    with pytest.raises(SegtrainError, match=rf"No tf.data service dispatcher answers at pipeline.data_service_address="
                                            rf"'grpc://localhost:{port}'.*segtrain data-service --port={port}"):
        service.wait_for_dispatcher(f"grpc://localhost:{port}", timeout=0)
    with pytest.raises(SegtrainError, match="pipeline.data_service_address='localhost' is not a dispatcher address"):
        _pipeline("localhost")


def test_a_prepared_dataset_is_served_by_two_workers(tmp_path):
    """Each worker of a distributed_epoch job reads only the record files handed to it (here: one
    worker all, the other none), so the prepared dataset must not assert its full cardinality."""
    from segtrain.data import pets
    from segtrain.data.prepare import load_prepared, prepare
    from tests.data import fabricate as F

    raw, out = tmp_path / "raw", tmp_path / "prepared"
    F.pets(str(raw), {"trainval": [f"cat_{i}" for i in range(4)], "test": ["dog_1"]}, size=(24, 20))
    prepare(pets.OxfordIiitPet(), str(raw), str(out), num_workers=1)
    ds, info = load_prepared(pets.OxfordIiitPet(), "trainval", str(out))
    with _servers() as (address, dispatcher, _):
        second, _ = service.start_worker(f"localhost:{service.split_address(dispatcher.target)[2]}")
        try:
            batches = _batches(build_pipeline(ds, info, "trainval", True, 2, 1, 0, run=str(tmp_path),
                                              crop_size=(16, 16), data_service_address=address), 6)
            assert all(b["image"].shape == (2, 16, 16, 3) for b in batches)
            assert second._num_tasks() == 1  # both workers took part in the job
        finally:
            gc.collect()
            second.stop()
    evaluation = build_pipeline(*load_prepared(pets.OxfordIiitPet(), "test", str(out)), "test", False, 2)
    assert evaluation.num_examples == 1  # the evaluation's progress line still knows its images


def test_the_trainer_reads_its_batches_from_the_service(configure, tmp_path):
    from segtrain.experiment import Experiment, ExperimentConfig
    from segtrain.train.trainer import Trainer

    # Servers of its own: stopping a worker that also holds the other tests' tasks can take
    # half a minute.
    with _servers() as (address, _, worker):
        configure(f"pipeline.data_service_address = '{address}'")  # TINY: batch 4, crops 32x32 of shapes
        trainer = Trainer(Experiment(ExperimentConfig()), str(tmp_path / "run"))
        iterator, crop_size = trainer.iterator(seed=0)
        assert worker._num_tasks() == 1, "the training input should be a job of the service"
        batch = next(iterator)
        assert crop_size == (32, 32)
        assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].dtype == tf.int32
        del trainer, iterator


@pytest.mark.slow  # a TensorFlow process of its own: 10-15 s on two busy cores
def test_the_command_serves_a_worker_until_sigterm():
    # Its own dispatcher: the stopped worker stays registered for minutes, and jobs of the
    # other tests would get tasks on it.
    dispatcher, port = service.start_dispatcher()
    proc = subprocess.Popen(
        [sys.executable, "-m", "segtrain.cli", "data-service", "--port=0", f"--dispatcher=localhost:{port}",
         "--host=localhost"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        match = wait_for_line(lines, r"tf.data service worker at localhost:(\d+), registered with dispatcher", 120,
                              alive=lambda: proc.poll() is None)
        assert int(match.group(1)) > 0
        assert dispatcher._num_workers() == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(lines)
        wait_for_line(lines, r"tf.data service stopped\.", 10)
    finally:
        if proc.poll() is None:
            proc.kill()
        dispatcher.stop()


def test_the_command_names_its_flags_and_needs_a_port():
    from tests.conftest import assert_user_error, segtrain_main

    result = segtrain_main("data-service", "--help")
    assert result.returncode == 0
    for flag in ("--port", "--dispatcher", "--host", "--verbosity"):
        assert flag in result.stdout
    assert_user_error(segtrain_main("data-service"), "--port is required")
    assert_user_error(segtrain_main("data-service", "--port=0", "--dispatcher=nowhere"),
                      "--dispatcher='nowhere' is not a dispatcher address")
