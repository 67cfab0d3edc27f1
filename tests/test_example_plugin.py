"""The example plugin package installs, registers its model through the entry point, and trains."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, segtrain_cli, tiny_flags

PLUGIN = os.path.join(REPO, "examples", "segtrain-example-plugin")


def test_example_plugin_installs_registers_and_trains(tmp_path):
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), PLUGIN],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert list(site.glob("segtrain_example_plugin-*.dist-info/entry_points.txt"))
    env = {"PYTHONPATH": os.pathsep.join([str(site), REPO])}  # as if installed into the environment
    listed = segtrain_cli("list", "--models", env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "context_net(num_classes, width=32, rates=(1, 1, 2, 4, 8, 16, 1))" in listed.stdout
    assert "losses:" not in listed.stdout
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
