"""Every built-in model (each thin variant as its builder's fullest one, e.g. DeepLab v3 as v3+;
SegFormer in tests/test_recipes.py) trains under the trainer: float32 and mixed_float16, with
and without XLA, on 1 and 2 replicas (logical CPU devices), with falling loss.

Two settings cover every level of the three factors: float32 without XLA on two replicas
(every model), and mixed_float16 with XLA on one device (the models with ops of their own). Two more
train a U-Net on two replicas in mixed_float16 with XLA and gradient accumulation, and DeepLab
v3+ in mixed_bfloat16 with dropout. On two replicas every copy of every variable must agree
after every window. One process trains the tiny form of every model (tests/models/tiny.py)
under all of them, each on a single repeated batch, so the loss must fall.
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

# Every model trained under two settings: minutes.
pytestmark = pytest.mark.slow

SETTINGS = {
    "float32, no XLA, 2 replicas": {"precision": "float32", "xla": False, "replicas": 2},
    # The models with ops of their own: a backbone (ResNet, VGG, Xception), ASPP and its decoder,
    # cropping skips. The plain convolution / batch norm / up-sampling U-Nets (unet, unet_compact,
    # unet_original) and encoder_decoder's bilinear head compile as unet in the next setting, and
    # unet_encoder's ResNet and up-sampling decoder as deeplabv3_plus's and unet's.
    "mixed_float16, XLA, 1 replica": {"precision": "mixed_float16", "xla": True, "replicas": 1,
                                      "models": None},  # set below
    # The other precisions, XLA and accumulation on 2 replicas, on a model whose batch norm is
    # all its own, and one with a backbone's, a decoder's and dropout: the copies must agree.
    # (Every model's backbone and decoder batch norms agree on 2 replicas in the first setting.)
    "mixed_float16, XLA, 2 replicas, accumulation": {
        "precision": "mixed_float16", "xla": True, "replicas": 2, "models": ["unet"],
        "bindings": ["train.accumulation_steps = 2"]},
    "mixed_bfloat16, no XLA, 2 replicas, dropout": {
        "precision": "mixed_bfloat16", "xla": False, "replicas": 2, "models": ["deeplabv3_plus"],
        "bindings": ["models.deeplabv3_plus.dropout = 0.5"]},
}
# Thin variants of one builder train as its fullest variant: unet_resnet50 is unet_encoder on a
# ResNet (unet.encoder_unet), DeepLab v3 is v3+ without the decoder, FCN-32s and 16s are FCN-8s
# with fewer skips (each is built and run in tests/test_export_agreement.py). SegFormer trains in
# tests/test_recipes.py (MiT-B0, its recipe, then every command on the run): here its
# attention's XLA compiles took minutes of the suite.
TRAINED = sorted(set(TINY_MODELS) - {"unet_resnet50", "deeplabv3", "fcn16s", "fcn32s", "segformer"})
SETTINGS["mixed_float16, XLA, 1 replica"]["models"] = sorted(
    set(TRAINED) - {"unet", "unet_compact", "unet_original", "encoder_decoder", "unet_encoder"})
CASES = [(setting, model) for setting in SETTINGS for model in SETTINGS[setting].get("models", TRAINED)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    spec = {"root": str(tmp_path_factory.mktemp("zoo")), "models": TRAINED, "settings": SETTINGS}
    # One process, one setting after the other: side by side they would only contend for the
    # same cores, with the other test worker.
    proc = subprocess.run([sys.executable, "-m", "tests.models.train_all", json.dumps(spec)], cwd=REPO,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True, timeout=1500)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("setting, model", CASES)
def test_model_trains_with_falling_loss(trained, setting, model):
    result = trained[setting][model]
    assert isinstance(result, dict), result  # else the error the run ended with
    losses = result["losses"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], f"{model} under {setting}: loss per window {losses}"


@pytest.mark.parametrize("setting, model", [(s, m) for s, m in CASES if SETTINGS[s]["replicas"] > 1])
def test_every_replica_holds_the_same_state_at_every_window_end(trained, setting, model):
    """Weights, batch-norm statistics (the model's, its backbone's, its decoder's), optimizer
    slots, loss scale and step: bit-identical copies on both replicas after every window."""
    result = trained[setting][model]
    assert isinstance(result, dict), result
    assert result["disagree"] == [[]] * len(result["losses"]), f"{model} under {setting}: {result['disagree']}"
