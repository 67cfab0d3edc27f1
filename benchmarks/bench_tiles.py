#!/usr/bin/env python3
"""Large images: `segtrain predict` tile by tile against the same sliding windows over the whole image.

    python benchmarks/bench_tiles.py --model_dir=runs/quickstart
    python benchmarks/bench_tiles.py --model_dir=runs/quickstart --size=6000 --crop=256 --tiles=512,1024,2048

It writes one photo-like RGB image of ``--size`` x ``--size`` pixels twice, as a PNG and as a
tiled TIFF, and runs `segtrain predict` on each in a fresh process, with windows of ``--crop``
every two thirds of it:

  whole        the PNG with --mode=slide: the image, its float32 copy and its logits in memory
               (the baseline)
  tiles T      the TIFF tile by tile (predict.large_image_pixels = 0, predict.tile_size = T):
               the same windows, each inferred once per output tile it overlaps

It prints, per way, the seconds of the predict command (TensorFlow's start-up and the run's
restore included, the same in each), the process's peak resident memory, and both as a ratio to
the baseline's; and checks that every way wrote the same mask.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CHILD = """
import resource, sys, time
t0 = time.perf_counter()
from segtrain.cli import main
code = main(["segtrain", "predict", *sys.argv[1:]])
print("BENCH", time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
sys.exit(code)
"""


def run_predict(args: list[str]) -> tuple[float, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if result.returncode:
        sys.exit(f"predict failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    seconds, peak = result.stdout.split("BENCH")[-1].split()
    return float(seconds), float(peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, help="a trained run")
    parser.add_argument("--size", type=int, default=4000, help="the image's height and width")
    parser.add_argument("--crop", type=int, default=256, help="the sliding windows' height and width")
    parser.add_argument("--tiles", default="1024,2048", help="output tile sizes to time, comma-separated")
    args = parser.parse_args()

    import numpy as np
    import tifffile
    from PIL import Image

    from benchmarks.bench_infer import photo_like

    work = tempfile.mkdtemp(prefix="bench_tiles_")
    tile = photo_like(1, 512, 512)[0]
    image = np.tile(tile, (-(-args.size // 512), -(-args.size // 512), 1))[:args.size, :args.size]
    Image.fromarray(image).save(os.path.join(work, "scene.png"), compress_level=1)
    tifffile.imwrite(os.path.join(work, "scene.tif"), image, tile=(256, 256), compression="zlib")
    del image
    window = ["--mode=slide", f"--crop_size={args.crop},{args.crop}"]
    common = [f"--model_dir={args.model_dir}", *window]
    ways = {"whole": common + [f"--input={work}/scene.png", f"--output={work}/whole",
                               "--gin_param=predict.large_image_pixels = 1000000000000"]}
    for t in (int(v) for v in args.tiles.split(",")):
        ways[f"tiles {t}"] = common + [f"--input={work}/scene.tif", f"--output={work}/tiles{t}",
                                       "--gin_param=predict.large_image_pixels = 0",
                                       f"--gin_param=predict.tile_size = {t}"]
    print(f"segtrain predict on a {args.size}x{args.size} image, windows {args.crop}x{args.crop} every two thirds "
          f"of it, {os.path.basename(args.model_dir.rstrip('/'))}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}", flush=True)
    results = {name: run_predict(argv) for name, argv in ways.items()}
    base_s, base_mb = results["whole"]
    print(f"{'way':<12}{'seconds':>10}{'x whole':>10}{'peak MB':>10}{'x whole':>10}")
    for name, (seconds, peak) in results.items():
        print(f"{name:<12}{seconds:>10.1f}{seconds / base_s:>10.2f}{peak:>10.0f}{peak / base_mb:>10.2f}")
    expected = np.asarray(Image.open(os.path.join(work, "whole", "scene.png")))
    for name in results:
        if name != "whole":
            got = tifffile.imread(os.path.join(work, name.replace(" ", ""), "scene.tif"))
            print(f"{name}: mask {'equals' if np.array_equal(got, expected) else 'DIFFERS FROM'} the whole image's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
