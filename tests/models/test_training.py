"""Every built-in model trains under the trainer: float32 and mixed_float16, with and without
XLA, on 1 and 2 replicas (logical CPU devices), with falling loss.

Two settings cover every level of the three factors for every model: float32 without XLA on
one device, and mixed_float16 with XLA on two replicas (the way GPUs train). Each setting is
one process training the tiny form of every model (tests/models/tiny.py) on a single repeated
batch, so the loss must fall; the two processes run side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.models.tiny import TINY_MODELS

# Every model trained under two settings in two processes: minutes.
pytestmark = pytest.mark.slow

SETTINGS = {
    "float32, no XLA, 2 replicas": {"precision": "float32", "xla": False, "replicas": 2},
    "mixed_float16, XLA, 1 replica": {"precision": "mixed_float16", "xla": True, "replicas": 1},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               # Faster XLA compiles for tiny models; the compiled step is the same.
               XLA_FLAGS="--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0")
    procs = {}
    try:
        for name, setting in SETTINGS.items():
            spec = {**setting, "runs": {m: str(root / f"{m}-{setting['replicas']}") for m in TINY_MODELS}}
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "tests.models.train_all", json.dumps(spec)], cwd=REPO, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        results = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=900)
            lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
            assert proc.returncode == 0 and lines, (name, out[-2000:], err[-4000:])
            results[name] = json.loads(lines[-1][len("RESULT "):])
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("model", sorted(TINY_MODELS))
def test_model_trains_with_falling_loss(trained, setting, model):
    losses = trained[setting][model]
    assert isinstance(losses, list), losses  # else the error the run ended with
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], f"{model} under {setting}: loss per window {losses}"
