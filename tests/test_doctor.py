"""`segtrain doctor`: the pre-flight check, on 2 logical CPUs and in this process.

Its run on a 2-process local cluster is in tests/test_launch.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from segtrain.train import preflight as P
from tests.conftest import segtrain_cli, segtrain_main

ROWS = ("versions", "cluster", "devices", "precision", "all-reduce", "1 vs N replicas", "replicas agree", "model_dir")


def _rows(out: str) -> dict[str, tuple[str, str]]:
    return {m.group(1): (m.group(2), m.group(3)) for m in
            re.finditer(r"^(\S+(?: \S+)*?) +(ok|FAIL|info|skip) +(.*)$", out, re.M)}


@pytest.mark.slow
def test_doctor_on_two_logical_cpus(tmp_path):
    model_dir = tmp_path / "run"
    result = segtrain_cli("doctor", "--cpu_replicas=2", f"--model_dir={model_dir}", "--gin_file=gin/quickstart.gin")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    rows = _rows(result.stdout)
    assert list(rows) == list(ROWS), result.stdout
    assert {k: v[0] for k, v in rows.items()} == {**dict.fromkeys(ROWS, "ok"), "versions": "info"}
    assert rows["cluster"][1] == "MirroredStrategy, 2 replica(s) on this machine; no cluster to form"
    assert rows["devices"][1].endswith("2 replica(s) here, 2 in all")
    assert re.match(r"SUM over 2 replicas correct; 16 MiB in [\d.]+ ms: [\d.]+ GB/s algorithm", rows["all-reduce"][1])
    assert rows["1 vs N replicas"][1].startswith("2 replicas train as 1: after 3 steps: losses ")
    assert rows["replicas agree"][1].startswith("every copy of ")
    assert rows["model_dir"][1].startswith(f"the chief can write {model_dir} (")
    assert "doctor: every check passed" in result.stdout
    assert not model_dir.exists(), "nothing is left in model_dir, not even the directory"


def test_doctor_fails_on_a_model_dir_it_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = segtrain_main("doctor", f"--model_dir={blocker}/run")
    assert result.returncode == 1, (result.stdout[-3000:], result.stderr[-3000:])
    rows = _rows(result.stdout)
    assert rows["cluster"][0] == "ok" and rows["all-reduce"] == ("skip", "one replica: nothing to reduce")
    assert rows["1 vs N replicas"][0] == "skip" and rows["replicas agree"][0] == "ok"
    assert rows["model_dir"] == ("FAIL", f"the chief cannot write {blocker}/run: Not a directory")
    assert "doctor: 1 check(s) failed: model_dir" in result.stderr


def test_doctor_reports_a_cluster_that_cannot_form(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker",
                                                                                                    "index": 3}}))
    result = segtrain_main("doctor")
    assert result.returncode == 1
    status, detail = _rows(result.stdout)["cluster"]
    assert status == "FAIL" and detail.startswith("TF_CONFIG task index 3 is outside cluster['worker']")
    assert "Traceback" not in result.stderr


def test_one_and_n_replicas_that_train_apart_fail_the_check():
    start = [np.zeros(4, np.float32)]
    reference = [np.full(4, 0.1, np.float32)]
    same = P._compare(2, [1.0, 0.9], [1.0, 0.9], [reference[0] + 1e-6], reference, start)
    apart = P._compare(2, [1.0, 0.9], [1.0, 0.9], [reference[0] * 1.5], reference, start)
    loss = P._compare(2, [1.0, 0.5], [1.0, 0.9], reference, reference, start)
    assert same.status == "ok" and apart.status == "FAIL" and loss.status == "FAIL"
    assert apart.detail.startswith("2 replicas and 1 train differently: after 3 steps")
