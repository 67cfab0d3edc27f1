#!/usr/bin/env python3
"""Makes the documentation's pictures of a trained run: predict's overlays and explain's Grad-CAM.

    python docs/make_pictures.py --model_dir=runs/quickstart

It takes the first ``--count`` test images of the run's dataset (for the quickstart: the
synthetic shapes), runs `segtrain predict` and `segtrain explain --class=CLASS` on them, exactly
as a user would, and tiles the results, under a title per column, into

    docs/pages/images/predict_overlay.png   input | ground truth | prediction | overlay, a row per image
    docs/pages/images/gradcam.png           input | Grad-CAM of --class at the layer explain used
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pages", "images")


def tile(rows, titles, cell: int = 160, gap: int = 4, title_height: int = 40):
    """One picture of rows of uint8 RGB images, each enlarged (nearest) to fit a ``cell`` square,
    under a title per column (a title may hold a line break)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    cols = max(len(r) for r in rows)
    out = np.full((title_height + len(rows) * (cell + gap) - gap, cols * (cell + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            h, w = image.shape[:2]
            scale = cell / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            big = np.asarray(Image.fromarray(image[..., :3]).resize(size, Image.NEAREST))
            top, left = title_height + i * (cell + gap), j * (cell + gap)
            out[top:top + big.shape[0], left:left + big.shape[1]] = big
    picture = Image.fromarray(out)
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default(size=13)
    for j, title in enumerate(titles):
        draw.multiline_text((j * (cell + gap) + cell // 2, title_height // 2), title, fill=(0, 0, 0), font=font,
                            anchor="mm", align="center")
    return picture


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

    import contextlib
    import io
    import re

    from segtrain.cli import main as segtrain
    from segtrain.commands.trained_run import parse_run
    from segtrain.experiment import Experiment

    parse_run(args.model_dir)
    dataset, info = Experiment(split=args.split).read(args.split)
    work = tempfile.mkdtemp(prefix="segtrain_pictures_")
    inputs = os.path.join(work, "images")
    os.makedirs(inputs)
    names, truths = [], []
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(info.palette)] = info.palette
    palette[info.ignore_label] = (255, 255, 255)
    for i, example in enumerate(dataset.take(args.count)):
        if info.decode is not None:
            example = info.decode(example)
        names.append(f"example{i}")
        Image.fromarray(example["image"].numpy()).save(os.path.join(inputs, f"{names[-1]}.png"))
        truths.append(palette[example["label"].numpy().squeeze()])
    gin.clear_config()

    out = os.path.join(work, "predict")
    if segtrain(["segtrain", "predict", f"--model_dir={args.model_dir}", f"--input={inputs}", f"--output={out}"]):
        return 1
    cams = os.path.join(work, "explain")
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        failed = segtrain(["segtrain", "explain", f"--model_dir={args.model_dir}", f"--input={inputs}",
                           f"--output={cams}", f"--class={args.class_name}"])
    print(said.getvalue(), end="")
    if failed:
        return 1
    layer = re.search(r" at layer (\S+) ", said.getvalue()).group(1)

    def read(path):
        return np.asarray(Image.open(path).convert("RGB"))

    rows = [[read(f"{inputs}/{n}.png"), truth, read(f"{out}/{n}_color.png"), read(f"{out}/{n}_overlay.jpg")]
            for n, truth in zip(names, truths)]
    tile(rows, ["input", "ground truth", "prediction", "prediction over\nthe input"]).save(
        os.path.join(IMAGES, "predict_overlay.png"), optimize=True)
    rows = [[read(f"{inputs}/{n}.png"), read(f"{cams}/{n}_{args.class_name}_gradcam.png")] for n in names]
    tile(rows, ["input", f"Grad-CAM of '{args.class_name}'\nat layer {layer}"], cell=200).save(
        os.path.join(IMAGES, "gradcam.png"), optimize=True)
    print(f"Wrote {IMAGES}/predict_overlay.png and {IMAGES}/gradcam.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
