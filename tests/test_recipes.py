"""The recipes of gin/experiments/ for the modern models, smoke-trained in tiny form on `shapes`:
SegFormer-B0 and DeepLab v3+ on ConvNeXt-T train, evaluate and predict.

Tiny form: the recipe as written (model, optimizer, fine-tuning settings), on `shapes` at 64x64
for a few steps; DeepLab v3+ on the small ConvNeXt of tests/models/tiny.py (the same code at a
few channels) with random weights, since the recipe's ImageNet weights would be a download.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, TINY, segtrain_main
from tests.models import tiny  # noqa: F401  (registers convnext_mini)

pytestmark = pytest.mark.slow

SHAPES = [b for b in TINY if not b.startswith(("train.model", "models.", "pipeline.crop_size", "datasets.shapes.m"))] + [
    "train.dataset = 'shapes'", "train.train_split = 'train'", "train.eval_split = 'validation'",
    "train.num_steps = 4", "train.eval_every = 4", "train.steps_per_loop = 2", "train.batch_size = 2",
    "pipeline.crop_size = (64, 64)", "datasets.shapes.min_size = 64", "datasets.shapes.max_size = 72",
    "learning_rate.warmup_steps = 0",
]
RECIPES = {
    "segformer_b0_cityscapes": ["models.segformer.decoder_dim = 64"],
    "deeplabv3_plus_convnext_tiny_voc2012": [
        "models.deeplabv3_plus.backbone = 'convnext_mini'", "backbones.convnext_tiny.weights = None",
        "models.deeplabv3_plus.aspp_filters = 16", "models.deeplabv3_plus.low_level_filters = 16",
        "models.deeplabv3_plus.decoder_filters = 16"],
}


def ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_the_recipe_trains_evaluates_and_predicts(recipe, tmp_path):
    """Each recipe's own gin file end to end. Its model's export and Grad-CAM are tested with every
    model's (tests/test_export_agreement.py, tests/test_explain.py)."""
    run = str(tmp_path / "run")
    gin_file = os.path.join(REPO, "gin", "experiments", f"{recipe}.gin")
    params = [f"--gin_param={b}" for b in SHAPES + RECIPES[recipe]]
    ok(segtrain_main("train", f"--gin_file={gin_file}", *params, f"--model_dir={run}"))
    evaluated = ok(segtrain_main("evaluate", f"--model_dir={run}", "--split=test", "--checkpoint=latest"))
    assert "mean_iou" in evaluated.stdout
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(image)
    ok(segtrain_main("predict", f"--model_dir={run}", f"--input={image}", f"--output={tmp_path / 'predicted'}",
                     "--checkpoint=latest"))
    assert os.listdir(tmp_path / "predicted")
