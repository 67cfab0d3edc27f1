"""The example plugin package installs, registers a model and a backbone through its entry
points, and trains them (DeepLab v3 on the plugin's backbone)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, segtrain_cli, segtrain_main, tiny_flags

PLUGIN = os.path.join(REPO, "examples", "segtrain-example-plugin")


@pytest.mark.slow
def test_example_plugin_installs_registers_and_trains(tmp_path):
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), PLUGIN],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert list(site.glob("segtrain_example_plugin-*.dist-info/entry_points.txt"))
    # The installed entry points, loaded here, register what `segtrain list` shows (the fresh
    # processes below find the same entry points by themselves).
    sys.path.insert(0, str(site))
    try:
        loaded = [ep.load() for ep in importlib.metadata.entry_points(group="segtrain.plugins")
                  if ep.dist.name == "segtrain-example-plugin"]
    finally:
        sys.path.remove(str(site))
    assert len(loaded) == 2
    listed = segtrain_main("list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "context_net(num_classes, width=32, rates=(1, 1, 2, 4, 8, 16, 1))" in listed.stdout
    assert "small_resnet(weights=None, freeze=False, freeze_batch_norm=False, width=32)" in listed.stdout
    env = {"PYTHONPATH": os.pathsep.join([str(site), REPO])}  # as if installed into the environment
    trained = segtrain_cli(
        "train", f"--model_dir={tmp_path / 'run'}", "--gin_file=gin/quickstart.gin",
        f"--gin_file={os.path.join(PLUGIN, 'example.gin')}",
        *tiny_flags("train.model = 'context_net'", "models.context_net.width = 4",
                    "models.context_net.rates = (1, 2)", "learning_rate.warmup_steps = 0"),
        env=env,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "ckpt-6.index").exists()
    assert "train.model = 'context_net'" in (tmp_path / "run" / "operative_config.gin").read_text()

    deeplab = segtrain_cli(
        "train", f"--model_dir={tmp_path / 'deeplab'}", "--gin_file=gin/quickstart.gin",
        f"--gin_file={os.path.join(PLUGIN, 'deeplab.gin')}",
        *tiny_flags("train.model = 'deeplabv3'", "models.deeplabv3.aspp_filters = 16", "train.num_image_panels = 0"),
        env=env,
    )
    assert deeplab.returncode == 0, deeplab.stderr[-3000:]
    operative = (tmp_path / "deeplab" / "operative_config.gin").read_text()
    # gin writes the shortest unambiguous name ('deeplabv3.backbone' for 'models.deeplabv3.backbone').
    assert "deeplabv3.backbone = 'small_resnet'" in operative and "small_resnet.width = 16" in operative
    evaluated = segtrain_cli("evaluate", f"--model_dir={tmp_path / 'deeplab'}", env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]


def test_the_example_backbone_dilates_under_deeplab(configure):
    """In process, without installing: the plugin's backbone gives DeepLab its stride-16 features."""
    sys.path.insert(0, PLUGIN)
    try:
        import segtrain_example_plugin.backbones  # noqa: F401  (registers small_resnet)
    finally:
        sys.path.remove(PLUGIN)
    from registry import MODELS

    configure("backbones.small_resnet.width = 16", tiny=False)
    model = MODELS.get("deeplabv3")(num_classes=3, backbone="small_resnet", aspp_filters=16, input_shape=(64, 64, 3))
    backbone = model.get_layer("backbone")
    # The strided convolution takes stride 1 at the rate before it; the convolutions after it dilate.
    assert backbone.get_layer("stage5_1_conv").strides == (1, 1)
    assert backbone.get_layer("stage5_1_conv").dilation_rate == (1, 1)
    assert backbone.get_layer("stage5_2_conv").dilation_rate == (2, 2)
    assert backbone(np.zeros((1, 64, 64, 3), np.float32)).shape[1:3] == (4, 4)  # 64 / 16
    assert model.output_shape == (None, 64, 64, 3) and model.output_stride == 16
