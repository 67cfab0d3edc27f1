#!/usr/bin/env python3
"""Makes the README's pictures of a trained run: predict's overlays and explain's Grad-CAM.

    python docs/make_pictures.py --model_dir=runs/quickstart

It takes the first ``--count`` test images of the run's dataset (for the quickstart: the
synthetic shapes), runs `segtrain predict` and `segtrain explain --class=CLASS` on them, exactly
as a user would, and tiles the results into

    docs/predict_overlay.png   image | colour mask | overlay, one row per image
    docs/gradcam.png           image | Grad-CAM of --class over the image, one row per image
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DOCS = os.path.dirname(os.path.abspath(__file__))


def tile(rows, cell: int = 160, gap: int = 4):
    """One picture of rows of uint8 RGB images, each enlarged (nearest) to fit a ``cell`` square."""
    import numpy as np
    from PIL import Image

    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (cell + gap) - gap, cols * (cell + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            h, w = image.shape[:2]
            scale = cell / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            big = np.asarray(Image.fromarray(image[..., :3]).resize(size, Image.NEAREST))
            top, left = i * (cell + gap), j * (cell + gap)
            out[top:top + big.shape[0], left:left + big.shape[1]] = big
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default="runs/quickstart")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--class_name", default="circle", help="the class Grad-CAM explains")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    import gin
    import numpy as np
    from PIL import Image

    from segtrain.cli import main as segtrain
    from segtrain.commands.trained_run import parse_run
    from segtrain.experiment import Experiment

    parse_run(args.model_dir)
    dataset, info = Experiment(split=args.split).read(args.split)
    work = tempfile.mkdtemp(prefix="segtrain_pictures_")
    inputs = os.path.join(work, "images")
    os.makedirs(inputs)
    names = []
    for i, example in enumerate(dataset.take(args.count)):
        if info.decode is not None:
            example = info.decode(example)
        names.append(f"example{i}")
        Image.fromarray(example["image"].numpy()).save(os.path.join(inputs, f"{names[-1]}.png"))
    gin.clear_config()

    out = os.path.join(work, "predict")
    if segtrain(["segtrain", "predict", f"--model_dir={args.model_dir}", f"--input={inputs}", f"--output={out}"]):
        return 1
    cams = os.path.join(work, "explain")
    if segtrain(["segtrain", "explain", f"--model_dir={args.model_dir}", f"--input={inputs}", f"--output={cams}",
                 f"--class={args.class_name}"]):
        return 1

    def read(path):
        return np.asarray(Image.open(path).convert("RGB"))

    rows = [[read(f"{inputs}/{n}.png"), read(f"{out}/{n}_color.png"), read(f"{out}/{n}_overlay.jpg")] for n in names]
    Image.fromarray(tile(rows)).save(os.path.join(DOCS, "predict_overlay.png"), optimize=True)
    rows = [[read(f"{inputs}/{n}.png"), read(f"{cams}/{n}_{args.class_name}_gradcam.png")] for n in names]
    Image.fromarray(tile(rows)).save(os.path.join(DOCS, "gradcam.png"), optimize=True)
    print(f"Wrote {DOCS}/predict_overlay.png and {DOCS}/gradcam.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
