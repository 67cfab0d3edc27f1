"""MLflow (a local SQLite store) and Weights & Biases (offline mode) beside TensorBoard: parameters,
scalars, images, final metrics, and a resumed run that goes on in the same tracked run."""

from __future__ import annotations

import glob
import json
import os
import struct

import gin
import pytest

from tests.conftest import TINY


def train(model_dir, *bindings):
    from segtrain.commands.configure import parse_config
    from segtrain.train.trainer import train as run

    gin.clear_config()
    parse_config([], [*TINY, *bindings])
    try:
        return run(str(model_dir))
    finally:
        gin.clear_config()


@pytest.mark.slow
def test_mlflow_logs_a_run_and_a_resume_continues_it(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts of a SQLite store go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    settings = ["train.trackers = ('mlflow',)", f"trackers.mlflow.tracking_uri = '{uri}'",
                "trackers.mlflow.experiment = 'tests'"]
    train(run_dir, *settings)
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.num_steps"] == "6" and run.data.params["models.unet.depth"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [3, 6]
    assert [m.step for m in client.get_metric_history(run_id, "eval/mean_iou")] == [3, 6]
    assert client.get_metric_history(run_id, "eval/per_class_iou/circle")
    results = json.loads((run_dir / "eval_results_validation.json").read_text())
    assert run.data.metrics["final/mean_iou"] == pytest.approx(results["mean_iou"])
    artifacts = {a.path for d in ("confusion_matrix", "examples") for a in client.list_artifacts(run_id, d)}
    assert "confusion_matrix/step_0000006.png" in artifacts and "examples/step_0000003_1.png" in artifacts

    train(run_dir, *settings, "train.num_steps = 9")  # more steps: the same tracked run goes on
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.num_steps"] == "6"
    assert run.data.tags["resumed_at_step_6/train.num_steps"] == "9"
    assert [m.step for m in client.get_metric_history(run_id, "eval/mean_iou")] == [3, 6, 9]
    assert len(client.search_runs([client.get_experiment_by_name("tests").experiment_id])) == 1


def wandb_records(path: str) -> list:
    """Every record of a W&B run file (a LevelDB-style log: 32 KiB blocks of chunks with a 7-byte
    header, after a 7-byte file header), decoded as wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, pending = open(path, "rb").read(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # zero padding to the block's end
            pos += left - 7
            continue
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@pytest.mark.slow
def test_wandb_offline_logs_a_run_and_a_resume_continues_it(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    settings = ["train.trackers = ('wandb',)", "trackers.wandb.mode = 'offline'", "trackers.wandb.project = 'tests'"]
    train(run_dir, *settings)
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    train(run_dir, *settings, "train.num_steps = 9")
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"] == run_id
    files = sorted(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb")))
    assert len(files) == 2, os.listdir(run_dir / "wandb")  # one per start, the same run id
    history = {}
    for path in files:
        records = wandb_records(path)
        assert any(r.WhichOneof("record_type") == "run" and r.run.run_id == run_id for r in records)
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
                history[int(items["_step"])] = items
    assert sorted(history) == [3, 6, 9]
    assert "eval/mean_iou" in history[9] and "train/loss" in history[3] and "confusion_matrix/filenames" in history[6]
    config = {i.key: i.value_json for r in wandb_records(files[0])
              for i in (r.run.config.update if r.WhichOneof("record_type") == "run" else
                        r.config.update if r.WhichOneof("record_type") == "config" else [])}
    assert "train.num_steps" in config and "models.unet.depth" in config, sorted(config)[:20]
