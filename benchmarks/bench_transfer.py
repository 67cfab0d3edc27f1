#!/usr/bin/env python3
"""Proof that transfer works: time to a test mIoU fine-tuning from a pretrained backbone's weights
file, against from random weights, over seeds.

    python benchmarks/bench_transfer.py                       # mobilenetv3_small, seeds 0,1,2
    python benchmarks/bench_transfer.py --backbone=efficientnetv2_b0 --json=transfer.json
    python benchmarks/bench_transfer.py --gin_param="backbones.mobilenetv3_small.batch_norm_momentum = 0.9"

1. Pretrain: `segtrain train` trains ``unet_encoder`` on ``--backbone`` on the `shapes` task
   (each class has its colour) for ``--pretrain_steps``.
2. Save: the trained backbone's weights go into a weights file of the backbone's own network
   (what ``backbones.<name>.weights`` loads), through `segtrain`'s trained-run restore.
3. Fine-tune: benchmarks/bench_accuracy.py trains the same model on a different task, `shapes`
   with ``random_colours`` (only geometry separates the classes; a new decoder from random
   weights), once with ``backbones.<name>.weights`` set to that file (``pretrained``) and once
   without (``random``), for each seed, and reports the training seconds to each test-mIoU
   threshold (mean and min-max over seeds) and the final test mIoU.

A weights file that silently failed to load would show as ``pretrained`` no faster than
``random``. Both fine-tuning recipes are identical but for that one binding.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def model_bindings(backbone: str) -> list[str]:
    # One input normalisation for every run (the pipeline's default, ImageNet mean and std): a
    # weights file of a keras.applications backbone would otherwise get that family's ImageNet
    # preprocessing, which these weights, trained here, do not expect.
    return ["train.model = 'unet_encoder'", f"models.unet_encoder.backbone = '{backbone}'",
            "models.unet_encoder.decoder_filters = (64, 32, 16, 16)",
            "pipeline.mean = (123.675, 116.28, 103.53)", "pipeline.std = (58.395, 57.12, 57.375)"]


def pretrain(backbone: str, steps: int, run: str, extra: list[str]) -> None:
    command = [sys.executable, "-m", "segtrain.cli", "train", f"--gin_file={REPO}/gin/quickstart.gin",
               *[f"--gin_param={b}" for b in model_bindings(backbone) + extra],
               f"--gin_param=train.num_steps = {steps}", f"--gin_param=train.eval_every = {steps}",
               f"--model_dir={run}"]
    print(f"[bench_transfer] pretraining {backbone} on shapes for {steps} steps", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=REPO)


SAVE = """
import sys
from registry import BACKBONES
from segtrain.commands.trained_run import parse_run, restored
run, backbone, path = sys.argv[1:]
parse_run(run)
experiment, _, step = restored(run, "latest")
trained = experiment.model.get_layer("backbone")
network = BACKBONES.get(backbone)().build((None, None, 3))
trained_layers = {layer.name: layer for layer in trained.layers}
copied = [layer for layer in network.layers if layer.weights and layer.name in trained_layers]
for layer in copied:
    layer.set_weights(trained_layers[layer.name].get_weights())
network.save_weights(path)
print(f"[bench_transfer] {backbone} weights of step {step} -> {path}: {len(copied)} of "
      f"{sum(1 for layer in network.layers if layer.weights)} layers trained (the rest is past the stages the "
      f"model uses)", file=sys.stderr)
"""


def save_backbone(run: str, backbone: str, path: str) -> None:
    """Writes the trained run's backbone weights as a file of the backbone's own network."""
    subprocess.run([sys.executable, "-c", SAVE, run, backbone, path], check=True, cwd=REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilenetv3_small", help="a registered backbone")
    p.add_argument("--pretrain_steps", type=int, default=600)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600, help="fine-tuning steps")
    p.add_argument("--every", type=int, default=50, help="test evaluation every this many steps")
    p.add_argument("--thresholds", default="0.5,0.7")
    p.add_argument("--workdir", default=None, help="keep the pretraining run and the weights file here")
    p.add_argument("--json", default=None)
    p.add_argument("--gin_param", action="append", default=[],
                   help="gin bindings for the pretraining and every fine-tuning run, e.g. "
                        "\"backbones.mobilenetv3_small.batch_norm_momentum = 0.9\"")
    args = p.parse_args(argv)
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="segtrain-bench-transfer-"))
    os.makedirs(workdir, exist_ok=True)
    weights = os.path.join(workdir, f"{args.backbone}_shapes.weights.h5")
    started = time.perf_counter()
    if not os.path.isfile(weights):
        pretrain(args.backbone, args.pretrain_steps, os.path.join(workdir, "pretrain"), args.gin_param)
        save_backbone(os.path.join(workdir, "pretrain"), args.backbone, weights)
    print(f"[bench_transfer] pretraining and saving took {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    import bench_accuracy

    bindings = ";".join(model_bindings(args.backbone) + args.gin_param)
    accuracy = ["--recipe", f"random:{bindings}",
                "--recipe", f"pretrained:{bindings};backbones.{args.backbone}.weights = '{weights}'",
                "--variants=colour_free", f"--seeds={args.seeds}", f"--steps={args.steps}", f"--every={args.every}",
                f"--thresholds={args.thresholds}"]
    if args.json:
        accuracy.append(f"--json={args.json}")
    return bench_accuracy.main(accuracy)


if __name__ == "__main__":
    sys.exit(main())
