#!/usr/bin/env python3
"""Training input pipeline of segtrain against a typical hand-written tf.data baseline, same run.

    python benchmarks/bench_input.py                                  # 200 VOC-like images, batch 16
    python benchmarks/bench_input.py --num_images=400 --batch=32 --train_images_per_s=23.2

It fabricates a Pascal VOC 2012 tree in a temporary directory (photo-like JPEGs of about
500x375 at quality 90, palettized PNG labels with class ids 0..20 and 255 object boundaries),
prepares it with ``segtrain.data.prepare.prepare`` (timed), and measures the images/s of two
training pipelines doing the same augmentation (the usual set: resize to 444x444, random
384x384 crop, random left-right flip, hue 0.1, brightness 0.1, contrast 0.8-1.2):

  segtrain  the ``voc2012`` dataset plugin (``data_dir=...``) through ``build_pipeline``:
            the prepared records, shuffled while encoded, decoded and augmented in one parallel
            map, batched, prefetched
  baseline  a typical hand-written pipeline: ``Dataset.from_generator``
            yielding (image path, label path) from the raw VOC files, JPEG decoded by TF and the
            palettized PNG label read with PIL through ``tf.numpy_function``, then one
            sequential ``.map`` per step (no num_parallel_calls, as in the book), shuffle
            (batch x 5), batch, repeat, prefetch. It keeps tf.data's default options, as the
            book's code gets them today: TF 2.21's default ``map_parallelization`` rewrite runs
            the maps without random ops (to float, resize) in parallel anyway, so the baseline
            uses more than one core

Neither pipeline caches: the baseline has no ``.cache()`` (it only helps from the second epoch
on, and segtrain's ``cache`` is off by default), so both decode every image from files in
every epoch. Both repeat forever.

Every round is its own process (like bench_train.py), so the two pipelines never share a
process: TensorFlow's CPU memory allocation is stateful, and in one process a round of the
baseline left the segtrain rounds after it twice as expensive (page faults; see RESULTS.md). A
round builds the pipeline, pulls ``--warmup_epochs`` epochs of batches untimed (this fills the
shuffle buffers and lets tf.data's autotuning settle) and times the next ``--epochs`` epochs.
Whole epochs matter for the baseline: its shuffle buffer (80 augmented images) drains at the end
of an epoch without new work and refills at the start of the next, so a window of a few batches
near the end of an epoch would overstate its speed up to 2x. The rounds alternate
(segtrain, baseline, segtrain, baseline, ...) and the best round of each counts, so a noisy
neighbour on the machine hurts both alike. Each round also reports the process's CPU time per
image (user and system, every thread): the work per image, which a neighbour changes less.

``--cpu_allocators`` repeats the comparison per CPU allocator: ``default`` (TensorFlow's
malloc-based one) and ``bfc`` (``TF_CPU_ALLOCATOR_USE_BFC=true``, TensorFlow's caching
allocator), because on this CPU the baseline's speed depends strongly on the allocator.

It prints images/s of both, the speed-up segtrain/baseline, and, with ``--train_images_per_s``
(a training throughput measured by bench_train.py), segtrain's images/s over training images/s:
above 1 the input pipeline keeps up with training on the same machine.

``--stages`` also times growing parts of the segtrain pipeline, each with the same parallel map
(one process, the first allocator): reading the records; + decoding (the floor segtrain's CPU
time per image is compared with); decoding only the crop's region of the JPEG (and the whole
PNG), as build_pipeline does; the old way's resize of the whole image to 444x444;
``build_pipeline`` without colour jitter (crop, flip, normalisation); + brightness and contrast;
+ hue (the full pipeline); the full pipeline with ``pipeline.colour_on_device`` (uint8 crops and
each image's colour draws; the training step jitters and normalises). Their CPU ms/image show
where the time goes. ``--colour_on_device`` runs segtrain's rounds (and the service's) that way.

``--data_service`` also times the segtrain pipeline made by a tf.data service
(``pipeline.data_service_address``) with 1 and 2 workers, alternating with rounds of the local
pipeline (default allocator). Dispatcher, workers and consumer run in one process on this
machine, so this measures the service's overhead, not the gain of workers on other machines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

RESIZE = (444, 444)
CROP = (384, 384)
HUE, BRIGHTNESS, CONTRAST = 0.1, 0.1, (0.8, 1.2)
DECODE_STAGE = "+ decode JPEG and PNG"  # the floor: segtrain's CPU time per image is compared with it
FULL_STAGE = "build_pipeline, full (+ hue)"
DEVICE_STAGE = "build_pipeline, full, colour on device (uint8 out)"
SIZES = ((375, 500), (500, 375), (333, 500), (375, 500), (366, 500), (500, 333))  # (height, width), VOC-like


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=200,
                   help="training images fabricated (val gets a tenth more)")
    p.add_argument("--batch", type=int, default=16, help="batch size")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (of the train split) per round")
    p.add_argument("--warmup_epochs", type=int, default=1, help="untimed epochs at the start of each round")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds (processes) per pipeline and allocator, alternating; the best counts")
    p.add_argument("--num_workers", type=int, default=2, help="processes of prepare()")
    p.add_argument("--train_images_per_s", type=float, default=None,
                   help="training images/s measured by bench_train.py, for the pipeline/training ratio")
    p.add_argument("--stages", action="store_true",
                   help="also time cumulative stages of the segtrain pipeline")
    p.add_argument("--workdir", default=None,
                   help="keep the fabricated and prepared data here (reused when present), not in a temp dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu_allocators", default="default,bfc",
                   help="comma list of default / bfc (TF_CPU_ALLOCATOR_USE_BFC=true); each gets its rounds")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--data_service", action="store_true",
                   help="also time the segtrain pipeline made by a tf.data service with 1 and 2 local workers")
    p.add_argument("--colour_on_device", action="store_true",
                   help="segtrain's pipeline (and the service's) with pipeline.colour_on_device: uint8 crops, "
                        "colour jitter and normalisation left to the training step")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one round, in its own process
    return p.parse_args(argv)


# ---- the dataset ----------------------------------------------------------------------------
def photo(rng, h: int, w: int):
    """A photo-like RGB image: colour fields at three scales, a gradient, and sensor noise.

    About 90 KiB as a 500x375 JPEG at quality 90, like a VOC photo; pure noise would be several
    times larger and slower to decode, a flat field much smaller and faster.
    """
    import numpy as np
    from PIL import Image

    def field(cells):
        small = rng.integers(0, 256, (max(h // cells, 2), max(w // cells, 2), 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)

    y = np.linspace(-40, 40, h, dtype=np.float32)[:, None, None]
    tint = rng.uniform(-1, 1, 3).astype(np.float32)
    pixels = 0.5 * field(60) + 0.3 * field(12) + 0.5 * (field(3) - 128) + y * tint
    pixels += rng.normal(0, 7, pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def voc_label(rng, h: int, w: int):
    """Class ids 0..20 in random object rectangles and ellipses, 255 on a 5-pixel band at object edges."""
    import numpy as np

    label = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(rng.integers(1, 5)):
        cls = rng.integers(1, 21)
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(h // 10, h // 3), rng.integers(w // 10, w // 3)
        if rng.random() < 0.5:
            label[max(cy - ry, 0):cy + ry, max(cx - rx, 0):cx + rx] = cls
        else:
            label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = cls
    edge = np.zeros((h, w), bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    band = edge.copy()
    for d in (1, 2):
        band[d:, :] |= edge[:-d, :]
        band[:-d, :] |= edge[d:, :]
        band[:, d:] |= edge[:, :-d]
        band[:, :-d] |= edge[:, d:]
    label[band] = 255
    return label


def fabricate(root: str, num_train: int, seed: int) -> dict:
    """VOCdevkit/VOC2012 with ``num_train`` train and num_train // 10 val images."""
    import numpy as np
    from PIL import Image

    from segtrain.data.info import default_palette

    base = os.path.join(root, "VOCdevkit", "VOC2012")
    lists = os.path.join(base, "ImageSets", "Segmentation")
    for d in ("JPEGImages", "SegmentationClass", lists):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    palette = np.zeros((256, 3), np.uint8)
    palette[:21] = default_palette(21)
    palette[255] = (224, 224, 192)
    rng = np.random.default_rng(seed)
    ids = [f"2026_{i:06d}" for i in range(num_train + max(num_train // 10, 1))]
    jpeg_bytes = 0
    for n, key in enumerate(ids):
        h, w = SIZES[n % len(SIZES)]
        path = os.path.join(base, "JPEGImages", f"{key}.jpg")
        Image.fromarray(photo(rng, h, w)).save(path, quality=90)
        jpeg_bytes += os.path.getsize(path)
        label = Image.fromarray(voc_label(rng, h, w), mode="P")
        label.putpalette(palette.flatten().tolist())
        label.save(os.path.join(base, "SegmentationClass", f"{key}.png"))
    train, val = ids[:num_train], ids[num_train:]
    for split, keys in (("train", train), ("val", val), ("trainval", ids)):
        with open(os.path.join(lists, f"{split}.txt"), "w") as f:
            f.write("".join(f"{k}\n" for k in keys))
    return {"images": len(ids), "mean_jpeg_kb": jpeg_bytes / len(ids) / 1024}


def train_pairs(root: str) -> list[tuple[str, str]]:
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    with open(os.path.join(base, "ImageSets", "Segmentation", "train.txt")) as f:
        keys = [line.strip() for line in f if line.strip()]
    return [(os.path.join(base, "JPEGImages", f"{k}.jpg"), os.path.join(base, "SegmentationClass", f"{k}.png"))
            for k in keys]


# ---- the two pipelines ----------------------------------------------------------------------
def segtrain_pipeline(data_dir: str, batch: int, seed: int, colour_on_device: bool = False):
    from registry import DATASETS
    from segtrain.data.pipeline import build_pipeline

    ds, info = DATASETS.original("voc2012")("train", data_dir=data_dir)
    return build_pipeline(ds, info, "train", True, batch, 1, seed, resize=RESIZE, crop_size=CROP, flip=True,
                          hue=HUE, brightness=BRIGHTNESS, contrast=CONTRAST, colour_on_device=colour_on_device)


def baseline_pipeline(pairs: list[tuple[str, str]], batch: int):
    """A typical hand-written pipeline: a generator of file names, one sequential map per step."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    def files():
        yield from pairs

    def load_label(path):
        return np.array(Image.open(path.decode()))  # palettized: the palette indices are the class ids

    def load(x, y):
        image = tf.image.decode_jpeg(tf.io.read_file(x))
        label = tf.numpy_function(load_label, [y], tf.uint8)
        return image, tf.ensure_shape(label, [None, None])  # numpy_function's output has no rank

    def to_float(image, label):
        return tf.cast(image, tf.float32) / 255.0, label

    def resize(image, label):
        image = tf.image.resize(image, RESIZE, method="bilinear")
        label = tf.image.resize(label[..., None], RESIZE, method="nearest")
        return image, label

    def crop(image, label):
        top = tf.random.uniform([], 0, RESIZE[0] - CROP[0] + 1, tf.int32)
        left = tf.random.uniform([], 0, RESIZE[1] - CROP[1] + 1, tf.int32)
        image = tf.image.crop_to_bounding_box(image, top, left, CROP[0], CROP[1])
        label = tf.image.crop_to_bounding_box(label, top, left, CROP[0], CROP[1])
        return image, label

    def flip(image, label):
        mirror = tf.random.uniform([]) > 0.5
        image = tf.cond(mirror, lambda: tf.image.flip_left_right(image), lambda: image)
        label = tf.cond(mirror, lambda: tf.image.flip_left_right(label), lambda: label)
        return image, label

    ds = tf.data.Dataset.from_generator(
        files, output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.string)))
    ds = ds.map(load)
    ds = ds.map(to_float)
    ds = ds.map(resize)
    ds = ds.map(crop)
    ds = ds.map(flip)
    ds = ds.map(lambda x, y: (tf.image.random_hue(x, HUE), y))
    ds = ds.map(lambda x, y: (tf.image.random_brightness(x, BRIGHTNESS), y))
    ds = ds.map(lambda x, y: (tf.image.random_contrast(x, *CONTRAST), y))
    ds = ds.shuffle(batch * 5)
    ds = ds.batch(batch)
    ds = ds.repeat()  # the generator ends with the epoch; repeat calls it again
    return ds.prefetch(tf.data.AUTOTUNE)


def stage_pipelines(data_dir: str, batch: int, seed: int) -> dict:
    """Cumulative parts of the segtrain pipeline, each parallel like the real one."""
    import tensorflow as tf

    from registry import DATASETS
    from segtrain.data.pipeline import build_pipeline
    from segtrain.data.transforms import random_region

    ds, info = DATASETS.original("voc2012")("train", data_dir=data_dir)
    n = info.num_examples["train"]

    def parallel(fn):
        out = ds.shuffle(n, seed=seed).repeat()
        out = out.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        return out.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def decoded(ex):  # the image's height only: nothing to batch but the decoding
        return {"height": tf.shape(info.decode(ex)["image"])[0]}

    def region(ex):  # the crop's region of the JPEG and the PNG, as build_pipeline draws it
        seeds = tf.unstack(tf.random.experimental.stateless_split(tf.stack([tf.constant(seed, tf.int64), 0]), 4))
        drawn = []

        def choose(size):
            drawn.append(random_region(size, seeds[0], seeds[1], RESIZE, 1.0, 1.0, CROP))
            return drawn[0].offset, drawn[0].extent

        return {"height": tf.shape(info.decode_region(ex, choose)["image"])[0]}

    def resized(ex):  # the top-left corner of the resized pair: batchable, no crop work
        ex = info.decode(ex)
        image = tf.image.resize(tf.cast(ex["image"], tf.float32), RESIZE)
        label = tf.image.resize(tf.cast(ex["label"], tf.int32)[..., None], RESIZE, method="nearest")
        return {"image": image[:CROP[0], :CROP[1]], "label": label[:CROP[0], :CROP[1], 0]}

    def segtrain(**colour):
        return build_pipeline(ds, info, "train", True, batch, 1, seed, resize=RESIZE, crop_size=CROP, flip=True,
                              **colour)

    return {
        "read records (shuffle, batch)": ds.shuffle(n, seed=seed).repeat().batch(batch).prefetch(-1),
        DECODE_STAGE: parallel(decoded),
        "decode the crop's region of the JPEG, and the PNG": parallel(region),
        "+ cast, resize image and label to 444": parallel(resized),
        "build_pipeline, no colour jitter": segtrain(),
        "build_pipeline, brightness + contrast": segtrain(brightness=BRIGHTNESS, contrast=CONTRAST),
        FULL_STAGE: segtrain(hue=HUE, brightness=BRIGHTNESS, contrast=CONTRAST),
        DEVICE_STAGE: segtrain(hue=HUE, brightness=BRIGHTNESS, contrast=CONTRAST, colour_on_device=True),
    }


# ---- --data_service: the same pipeline made by a tf.data service ----------------------------
SERVICE_ROUNDS = ("segtrain", "service:1", "service:2")


def service_round(args, workers: int, warmup: int, batches: int) -> dict:
    """One round of the segtrain pipeline through a dispatcher and ``workers`` workers, all in
    this process (so on this machine's cores, like the local pipeline)."""
    import functools

    import tensorflow_datasets as tfds

    from registry import DATASETS
    from segtrain.data import prepare, service
    from segtrain.data.pipeline import build_pipeline

    # Each worker reads only the record files the dispatcher hands it, so tfds's check that
    # one reader sees every example of the split fails with 2 workers: read without it.
    prepare.tfds.ReadConfig = functools.partial(tfds.ReadConfig, assert_cardinality=False)
    dispatcher, port = service.start_dispatcher()
    servers = [service.start_worker(f"localhost:{port}")[0] for _ in range(workers)]  # noqa: F841 (kept alive)
    ds, info = DATASETS.original("voc2012")("train", data_dir=os.path.join(args.workdir, "prepared"))
    ds = build_pipeline(ds, info, "train", True, args.batch, 1, args.seed, resize=RESIZE, crop_size=CROP, flip=True,
                        hue=HUE, brightness=BRIGHTNESS, contrast=CONTRAST,
                        data_service_address=f"grpc://localhost:{port}", colour_on_device=args.colour_on_device)
    print("ROW " + json.dumps(time_round(ds, warmup, batches)), flush=True)
    os._exit(0)  # the servers' shutdown can take a minute; the round is done


def data_service_rounds(args) -> dict:
    """Alternating rounds of the local pipeline and of the service with 1 and 2 workers."""
    rounds = {name: [] for name in SERVICE_ROUNDS}
    for r in range(args.rounds):
        for name, outs in rounds.items():
            outs.append(run_one(args, name, "default"))
            out = outs[-1]
            print(f"data service round {r + 1}, {name}: " + (f"failed ({out['error']})" if "error" in out else
                  f"{out['images_per_s']:.1f} images/s, {out['cpu_ms_per_image']:.1f} CPU ms/image"),
                  file=sys.stderr, flush=True)
    return rounds


def data_service_report(r: dict) -> list[str]:
    rounds = r.get("data_service")
    if not rounds:
        return []
    ok = {name: [o for o in outs if "error" not in o] for name, outs in rounds.items()}
    best = {name: max((o["images_per_s"] for o in outs), default=None) for name, outs in ok.items()}
    lines = ["", "tf.data service (default allocator; dispatcher, workers and consumer share this machine's cores):",
             "", "| pipeline | img/s (best) | vs local | CPU ms/img | img/s per round |", "|---|---|---|---|---|"]
    names = {"segtrain": "local", "service:1": "service, 1 worker", "service:2": "service, 2 workers"}
    for name, outs in rounds.items():
        ratio = best[name] / best["segtrain"] if best[name] and best["segtrain"] else None
        cpu = min((o["cpu_ms_per_image"] for o in ok[name]), default=None)
        per_round = ", ".join("failed" if "error" in o else f"{o['images_per_s']:.1f}" for o in outs)
        lines.append(f"| {names[name]} | {_num(best[name], 1)} | {_num(ratio, 2)}x | {_num(cpu, 1)} | {per_round} |")
    return lines


# ---- timing, one round per process ---------------------------------------------------------
def batch_images(element) -> int:
    first = element[0] if isinstance(element, tuple) else next(iter(element.values()))
    return int(first.shape[0])


def time_round(dataset, warmup: int, batches: int) -> dict:
    """images/s and CPU ms/image (user, system) of ``batches`` batches after ``warmup`` untimed ones.

    The CPU time is the whole process's (every thread) over the timed batches: the work per
    image, which a busy neighbour on the machine changes much less than the images/s.
    """
    it = iter(dataset)
    for _ in range(warmup):
        next(it)
    images = 0
    t0, c0 = time.perf_counter(), os.times()
    for _ in range(batches):
        images += batch_images(next(it))
    seconds, c1 = time.perf_counter() - t0, os.times()
    user, system = 1e3 * (c1.user - c0.user) / images, 1e3 * (c1.system - c0.system) / images
    return {"images_per_s": images / seconds, "cpu_ms_per_image": user + system, "sys_ms_per_image": system}


def one(args) -> dict:
    """The internal --one=<segtrain|baseline|stages>: one round in this process."""
    import tensorflow as tf

    tf.random.set_seed(args.seed)
    source_dir, data_dir = os.path.join(args.workdir, "raw"), os.path.join(args.workdir, "prepared")
    pairs = train_pairs(source_dir)

    # segtrain and the stages batch with drop_remainder after repeat: epochs are a count of images.
    # The baseline batches each epoch, the last batch short: ceil(n / batch) batches an epoch.
    def batches(epochs):
        return -(-epochs * len(pairs) // args.batch)

    if args.one.startswith("service:"):
        return service_round(args, int(args.one.split(":")[1]), batches(args.warmup_epochs), batches(args.epochs))
    if args.one == "stages":
        return {name: time_round(ds, batches(args.warmup_epochs), batches(args.epochs))
                for name, ds in stage_pipelines(data_dir, args.batch, args.seed).items()}
    if args.one == "segtrain":
        ds = segtrain_pipeline(data_dir, args.batch, args.seed, args.colour_on_device)
        return time_round(ds, batches(args.warmup_epochs), batches(args.epochs))
    per_epoch = -(-len(pairs) // args.batch)
    ds = baseline_pipeline(pairs, args.batch)
    return time_round(ds, args.warmup_epochs * per_epoch, args.epochs * per_epoch)


def run_one(args, what: str, allocator: str) -> dict:
    """Runs ``--one=what`` in a fresh process; its result, or {'error': ...}."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    if allocator == "bfc":
        env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    flags = [f"--batch={args.batch}", f"--epochs={args.epochs}", f"--warmup_epochs={args.warmup_epochs}",
             f"--seed={args.seed}", f"--workdir={args.workdir}", f"--one={what}"]
    if args.colour_on_device:
        flags.append("--colour_on_device")
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *flags], capture_output=True, text=True,
                            env=env, cwd=REPO, check=False)
    line = next((x for x in result.stdout.splitlines() if x.startswith("ROW ")), None)
    if result.returncode or line is None:
        return {"error": f"exit {result.returncode}: " + "\n".join(result.stderr.strip().splitlines()[-5:])}
    return json.loads(line[4:])


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model or platform.processor() or platform.machine()}"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.one:
        print("ROW " + json.dumps(one(args)), flush=True)
        return 0
    allocators = [a for a in args.cpu_allocators.split(",") if a]
    if any(a not in ("default", "bfc") for a in allocators):
        raise SystemExit(f"--cpu_allocators takes default and bfc, got {args.cpu_allocators!r}")

    import tensorflow as tf

    from segtrain.data.prepare import prepare
    from segtrain.data.voc import Voc2012

    keep = bool(args.workdir)
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="segtrain-bench-input-"))
    source_dir, data_dir = os.path.join(args.workdir, "raw"), os.path.join(args.workdir, "prepared")
    result = {"date": str(datetime.date.today()), "machine": machine(), "tensorflow": tf.__version__,
              "num_images": args.num_images, "batch": args.batch, "epochs": args.epochs,
              "warmup_epochs": args.warmup_epochs, "rounds": args.rounds,
              "train_images_per_s": args.train_images_per_s}
    failed = False
    try:
        listed = os.path.join(source_dir, "VOCdevkit", "VOC2012", "ImageSets", "Segmentation", "trainval.txt")
        if not os.path.isfile(listed):
            t0 = time.perf_counter()
            made = fabricate(source_dir, args.num_images, args.seed)
            print(f"Fabricated {made['images']} images (mean JPEG {made['mean_jpeg_kb']:.0f} KiB) "
                  f"in {time.perf_counter() - t0:.1f} s.", file=sys.stderr, flush=True)
            result["mean_jpeg_kib"] = made["mean_jpeg_kb"]
        t0 = time.perf_counter()
        prepared = prepare(Voc2012(), source_dir, data_dir, num_workers=args.num_workers, stream=sys.stderr)
        prepare_s = time.perf_counter() - t0
        checked = sum(prepared["splits"].values())
        result["prepare_s"] = prepare_s if checked else None  # None: reused an earlier --workdir
        result["prepare_examples"] = checked
        result["prepared_mib"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(data_dir)
                                     for f in fs) / 2**20

        result["rows"] = []
        for allocator in allocators:
            rounds = {"segtrain": [], "baseline": []}
            for r in range(args.rounds):
                for name, outs in rounds.items():
                    out = run_one(args, name, allocator)
                    outs.append(out)
                    if "error" in out:
                        print(f"{allocator} round {r + 1} {name} failed ({out['error']})", file=sys.stderr)
                        continue
                    print(f"{allocator} allocator, round {r + 1}, {name}: {out['images_per_s']:.1f} images/s, "
                          f"{out['cpu_ms_per_image']:.1f} CPU ms/image ({out['sys_ms_per_image']:.1f} system; "
                          f"{out['images_per_s'] * out['cpu_ms_per_image'] / 1e3:.2f} cores busy)",
                          file=sys.stderr, flush=True)
            row = {"allocator": allocator, "rounds": rounds}
            for name, outs in rounds.items():
                ok = [o for o in outs if "error" not in o]
                failed |= len(ok) < len(outs)
                best = max(ok, key=lambda o: o["images_per_s"]) if ok else None
                row[f"{name}_images_per_s"] = best["images_per_s"] if best else None
                row[f"{name}_cpu_ms_per_image"] = min(o["cpu_ms_per_image"] for o in ok) if ok else None
                row[f"{name}_sys_ms_per_image"] = min(o["sys_ms_per_image"] for o in ok) if ok else None
            both = row["segtrain_images_per_s"] and row["baseline_images_per_s"]
            row["speedup"] = row["segtrain_images_per_s"] / row["baseline_images_per_s"] if both else None
            row["pipeline_vs_train"] = (row["segtrain_images_per_s"] / args.train_images_per_s
                                        if args.train_images_per_s and row["segtrain_images_per_s"] else None)
            result["rows"].append(row)
        if args.stages:
            stages = run_one(args, "stages", allocators[0])
            failed |= "error" in stages
            result["stages"] = stages
            result["stages_allocator"] = allocators[0]
        if args.data_service:
            result["data_service"] = data_service_rounds(args)
            failed |= any("error" in o for outs in result["data_service"].values() for o in outs)
    finally:
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if failed else 0


def report(r: dict) -> str:
    prep = "reused" if r["prepare_s"] is None else (
        f"{r['prepare_s']:.1f} s for {r['prepare_examples']} examples "
        f"({r['prepare_examples'] / r['prepare_s']:.1f} examples/s)")
    lines = [
        (f"# bench_input  {r['date']}  images={r['num_images']} batch={r['batch']} timed epochs/round="
         f"{r['epochs']} warmup epochs={r['warmup_epochs']} rounds={r['rounds']}  machine={r['machine']}  "
         f"tf={r['tensorflow']}"),
        "",
        f"prepare: {prep}, {r['prepared_mib']:.1f} MiB written"
        + (f"; mean source JPEG {r['mean_jpeg_kib']:.0f} KiB" if "mean_jpeg_kib" in r else ""),
        "",
        ("| CPU allocator | segtrain img/s | baseline img/s | segtrain/baseline | segtrain CPU ms/img (system) "
         "| baseline CPU ms/img (system) | segtrain img/s per round | baseline img/s per round "
         f"| segtrain/training ({_num(r['train_images_per_s'], 1)} img/s) |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def per_round(outs):
        return ", ".join("failed" if "error" in o else f"{o['images_per_s']:.1f}" for o in outs)

    for row in r["rows"]:
        cpu = {n: f"{_num(row[f'{n}_cpu_ms_per_image'], 1)} ({_num(row[f'{n}_sys_ms_per_image'], 1)})"
               for n in ("segtrain", "baseline")}
        lines.append(
            f"| {row['allocator']} | {_num(row['segtrain_images_per_s'], 1)} "
            f"| {_num(row['baseline_images_per_s'], 1)} | {_num(row['speedup'], 2)}x "
            f"| {cpu['segtrain']} | {cpu['baseline']} "
            f"| {per_round(row['rounds']['segtrain'])} | {per_round(row['rounds']['baseline'])} "
            f"| {_num(row['pipeline_vs_train'], 2)} |"
        )
    errors = [o["error"] for row in r["rows"] for outs in row["rounds"].values() for o in outs if "error" in o]
    lines += [f"- failed round: {e.splitlines()[-1][:200] if e else '?'}" for e in errors]
    stages = r.get("stages")
    if stages:
        lines += ["", f"segtrain stages ({r['stages_allocator']} allocator, one round each):", "",
                  "| stage (cumulative) | img/s | CPU ms/img (system) |", "|---|---|---|"]
        if "error" in stages:
            lines.append(f"| failed: {stages['error'].splitlines()[-1][:100]} | | |")
        else:
            lines += [f"| {k} | {v['images_per_s']:.1f} | {v['cpu_ms_per_image']:.1f} "
                      f"({v['sys_ms_per_image']:.1f}) |" for k, v in stages.items()]
            floor = stages.get(DECODE_STAGE, {}).get("cpu_ms_per_image")
            if floor:
                lines += ["", f"CPU time per image over decoding alone ({floor:.1f} ms, same run): "
                          + ", ".join(f"segtrain {row['allocator']} {row['segtrain_cpu_ms_per_image'] / floor:.2f}x"
                                      for row in r["rows"] if row["segtrain_cpu_ms_per_image"])
                          + f", full-pipeline stage {stages[FULL_STAGE]['cpu_ms_per_image'] / floor:.2f}x"
                          + f", colour on device {stages[DEVICE_STAGE]['cpu_ms_per_image'] / floor:.2f}x"]
    lines += data_service_report(r)
    return "\n".join(lines)


def _num(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
