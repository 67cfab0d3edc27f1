"""Tiny datasets written in the exact on-disk formats, with the labels the readers must return.

Every writer returns {key: expected class-id label (uint8 [H, W])}.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from segtrain.data.info import default_palette


def _rng(seed):
    return np.random.default_rng(seed)


def image(path, h, w, seed, fmt=None):
    """A smooth random RGB image (compresses like a photo), saved as JPEG or PNG by extension."""
    rng = _rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt, quality=90)
    return pixels


def blocks(h, w, values, seed):
    """A label of random rectangles drawn from ``values`` (every value appears for seed-chosen sizes)."""
    rng = _rng(seed)
    label = np.full((h, w), values[0], np.uint8)
    for i in range(12):
        y, x = rng.integers(0, h), rng.integers(0, w)
        label[y:y + rng.integers(1, h // 2 + 2), x:x + rng.integers(1, w // 2 + 2)] = values[i % len(values)]
    return label


def voc_palette_image(values):
    im = Image.fromarray(values, mode="P")
    table = np.zeros((256, 3), np.uint8)
    table[:21] = default_palette(21)
    table[255] = (224, 224, 192)
    im.putpalette(table.flatten().tolist())
    return im


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))


def voc(root, splits=None, size=(20, 28), seed=0):
    """VOCdevkit/VOC2012 with palettized labels (classes 0..20 and 255 boundaries)."""
    splits = splits or {"train": ["2007_000032", "2007_000039", "2008_000001"], "val": ["2007_000063", "2009_000010"]}
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    expected = {}
    for n, key in enumerate(sorted({k for ids in splits.values() for k in ids})):
        h, w = size[0] + n, size[1] + 2 * n  # every image its own size
        image(os.path.join(base, "JPEGImages", f"{key}.jpg"), h, w, seed + n)
        label = blocks(h, w, [0, 1 + n % 20, 15, 255, 20], seed + n)
        os.makedirs(os.path.join(base, "SegmentationClass"), exist_ok=True)
        voc_palette_image(label).save(os.path.join(base, "SegmentationClass", f"{key}.png"))
        expected[key] = label
    for split, ids in splits.items():
        write_lines(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), ids)
    if "train" in splits and "val" in splits:
        write_lines(os.path.join(base, "ImageSets", "Segmentation", "trainval.txt"), splits["train"] + splits["val"])
    return expected


def sbd(root, ids, voc_root, size=(20, 28), seed=100, lists=True):
    """The SBD release's dataset/cls/<id>.mat (+ train.txt/val.txt); images go into the VOC tree."""
    import scipy.io

    base = os.path.join(root, "benchmark_RELEASE", "dataset")
    expected = {}
    for n, key in enumerate(ids):
        path = os.path.join(voc_root, "VOCdevkit", "VOC2012", "JPEGImages", f"{key}.jpg")
        if os.path.exists(path):  # an image of VOC's own lists: SBD annotates the same picture
            w, h = Image.open(path).size
        else:
            h, w = size[0] + n, size[1] + n
            image(path, h, w, seed + n)
        label = blocks(h, w, [0, 3, 7 + n % 10], seed + n)
        os.makedirs(os.path.join(base, "cls"), exist_ok=True)
        gt = {"Segmentation": label, "Boundaries": np.zeros((1, 1)), "CategoriesPresent": np.unique(label)[1:]}
        scipy.io.savemat(os.path.join(base, "cls", f"{key}.mat"), {"GTcls": gt})
        expected[key] = label
    if lists:
        half = len(ids) // 2
        write_lines(os.path.join(base, "train.txt"), ids[:half])
        write_lines(os.path.join(base, "val.txt"), ids[half:])
    return expected


def pets(root, splits=None, size=(24, 30), seed=0):
    """images/*.jpg, annotations/trimaps/*.png (values 1, 2, 3) and the split lists."""
    splits = splits or {"trainval": ["Abyssinian_1", "beagle_12", "Bengal_3"], "test": ["pug_7", "Sphynx_2"]}
    expected = {}
    for n, key in enumerate(sorted({k for ids in splits.values() for k in ids})):
        h, w = size[0] + n, size[1] - n
        image(os.path.join(root, "images", f"{key}.jpg"), h, w, seed + n)
        trimap = blocks(h, w, [2, 1, 3], seed + n)
        os.makedirs(os.path.join(root, "annotations", "trimaps"), exist_ok=True)
        Image.fromarray(trimap, mode="L").save(os.path.join(root, "annotations", "trimaps", f"{key}.png"))
        expected[key] = trimap - 1
    for split, ids in splits.items():
        write_lines(os.path.join(root, "annotations", f"{split}.txt"), [f"{k} 1 1 1" for k in ids])
    return expected


CITYSCAPES_LABEL_IDS = [0, 1, 4, 7, 8, 11, 13, 20, 21, 23, 24, 26, 27, 29, 31, 33]


def cityscapes(root, splits=None, size=(16, 32), seed=0):
    """leftImg8bit/<split>/<city>/*.png and gtFine/<split>/<city>/*_gtFine_labelIds.png."""
    from segtrain.data.cityscapes import label_id_to_train_id

    splits = splits or {"train": ["aachen_000000_000019", "bochum_000000_000313", "aachen_000001_000019"],
                        "val": ["frankfurt_000000_000294"], "test": ["berlin_000000_000019"]}
    lut = label_id_to_train_id()
    expected = {}
    n = 0
    for split, stems in splits.items():
        for stem in stems:
            city = stem.split("_")[0]
            h, w = size[0] + n, size[1] + n
            image(os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"), h, w, seed + n)
            ids = blocks(h, w, CITYSCAPES_LABEL_IDS[n % 3:], seed + n)
            path = os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(ids, mode="L").save(path)
            expected[f"{city}/{stem}"] = lut[ids].astype(np.uint8)
            n += 1
    return expected


def folder(root, stems, num_classes=3, rgb=False, palette=None, size=(18, 22), seed=0, ext=".jpg"):
    """images/<stem>.jpg with masks/<stem>.png: class-index PNGs, or RGB colour masks of ``palette``."""
    palette = palette or default_palette(num_classes)
    expected = {}
    for n, stem in enumerate(stems):
        h, w = size[0] + n % 3, size[1]
        image(os.path.join(root, "images", stem + ext), h, w, seed + n)
        label = blocks(h, w, list(range(num_classes)) + [255], seed + n)
        os.makedirs(os.path.join(root, "masks"), exist_ok=True)
        if rgb:
            colours = np.zeros((256, 3), np.uint8)
            colours[:num_classes] = palette
            colours[255] = (255, 255, 255)
            Image.fromarray(colours[label]).save(os.path.join(root, "masks", stem + ".png"))
        else:
            Image.fromarray(label, mode="L").save(os.path.join(root, "masks", stem + ".png"))
        expected[stem] = label
    return expected


def folder_multilabel(root, stems, layout, labels=("a", "b", "c"), size=(18, 22), seed=0):
    """images/<stem>.png with multi-label masks in ``layout`` ('bits', 'channels', 'masks'):
    overlapping random blocks per label; returns {stem: expected packed label bits} ('bits'
    masks also hold ignored pixels, 255)."""
    expected = {}
    n = len(labels)
    for k, stem in enumerate(stems):
        h, w = size[0] + k % 3, size[1]
        image(os.path.join(root, "images", stem + ".png"), h, w, seed + k)
        planes = np.stack([blocks(h, w, [0, 1], seed + 10 * k + i) for i in range(n)], -1).astype(bool)
        packed = (planes.astype(np.uint8) << np.arange(n, dtype=np.uint8)).sum(-1).astype(np.uint8)
        masks = os.path.join(root, "masks")
        os.makedirs(masks, exist_ok=True)
        if layout == "bits":
            packed[blocks(h, w, [0, 0, 0, 1], seed + k + 99) == 1] = 255
            Image.fromarray(packed, mode="L").save(os.path.join(masks, stem + ".png"))
        elif layout == "channels":  # a label is present where its channel is not 0 (any value)
            values = planes * np.arange(1, n + 1, dtype=np.uint8) * 60
            if n in (1, 3):  # a grey (binary) or RGB PNG
                Image.fromarray(values.astype(np.uint8).squeeze(-1) if n == 1 else values.astype(np.uint8),
                                mode="L" if n == 1 else "RGB").save(os.path.join(masks, stem + ".png"))
            else:
                import tifffile

                tifffile.imwrite(os.path.join(masks, stem + ".tif"), values.astype(np.uint8),
                                 photometric="minisblack", planarconfig="contig")
        else:  # one binary mask per label; an empty label's file left out
            for i, name in enumerate(labels):
                if planes[..., i].any():
                    _label_png(os.path.join(masks, name, stem + ".png"), planes[..., i].astype(np.uint8) * 255)
        expected[stem] = packed
    return expected


def folder_bands(root, stems, channels=4, size=(18, 22), seed=0, num_classes=3):
    """images/<stem>.tif of ``channels`` uint16 bands with masks/<stem>.png class ids; returns
    {stem: pixels}."""
    import tifffile

    rng = _rng(seed)
    pixels = {}
    for n, stem in enumerate(stems):
        h, w = size[0] + n % 3, size[1]
        x = rng.integers(0, 50000, (h, w, channels)).astype(np.uint16)
        os.makedirs(os.path.join(root, "images"), exist_ok=True)
        tifffile.imwrite(os.path.join(root, "images", stem + ".tif"), x, photometric="minisblack",
                         planarconfig="contig")
        _label_png(os.path.join(root, "masks", stem + ".png"), blocks(h, w, list(range(num_classes)), seed + n))
        pixels[stem] = x
    return pixels


def _label_png(path, values):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(values, mode="L").save(path)


ADE20K_VALUES = [0, 1, 13, 75, 150]


def ade20k(root, splits=None, size=(18, 26), seed=0):
    """ADEChallengeData2016/images/<training|validation>/*.jpg and annotations/.../*.png (0..150)."""
    splits = splits or {"train": ["ADE_train_00000001", "ADE_train_00000002"], "val": ["ADE_val_00000001"]}
    base = os.path.join(root, "ADEChallengeData2016")
    expected = {}
    for n, (split, key) in enumerate((s, k) for s, keys in splits.items() for k in keys):
        folder = {"train": "training", "val": "validation"}[split]
        h, w = size[0] + n, size[1] + n
        image(os.path.join(base, "images", folder, f"{key}.jpg"), h, w, seed + n)
        values = blocks(h, w, ADE20K_VALUES[n % 2:], seed + n)
        _label_png(os.path.join(base, "annotations", folder, f"{key}.png"), values)
        expected[key] = np.where(values == 0, 255, values.astype(np.int32) - 1).astype(np.uint8)
    return expected


COCO_STUFF_VALUES = [255, 0, 12, 91, 181, 10]  # 255 unlabeled; 12 is class 11 (11 is unannotated)


def coco_stuff(root, splits=None, size=(20, 24), seed=0):
    """dataset/images/<train2017|val2017>/*.jpg and dataset/annotations/.../*.png (stuff-thing maps)."""
    from segtrain.data.coco_stuff import map_value_to_class

    splits = splits or {"train": ["000000000009", "000000000025"], "val": ["000000000139"]}
    lut = map_value_to_class()
    expected = {}
    for n, (split, key) in enumerate((s, k) for s, keys in splits.items() for k in keys):
        folder = {"train": "train2017", "val": "val2017"}[split]
        h, w = size[0] + n, size[1] - n
        image(os.path.join(root, "dataset", "images", folder, f"{key}.jpg"), h, w, seed + n)
        values = blocks(h, w, COCO_STUFF_VALUES[n % 2:], seed + n)
        _label_png(os.path.join(root, "dataset", "annotations", folder, f"{key}.png"), values)
        expected[key] = lut[values].astype(np.uint8)
    return expected


def drive(root, splits=None, size=(21, 19), seed=0):
    """DRIVE/<training|test>/images/<n>_<split>.tif, 1st_manual/<n>_manual1.gif, mask/<n>_<split>_mask.gif."""
    splits = splits or {"train": ["21", "22"], "test": ["01"]}
    expected = {}
    for n, (split, key) in enumerate((s, k) for s, keys in splits.items() for k in keys):
        folder = {"train": "training", "test": "test"}[split]
        base = os.path.join(root, "DRIVE", folder)
        h, w = size[0] + n, size[1] + n
        image(os.path.join(base, "images", f"{key}_{folder}.tif"), h, w, seed + n, fmt="TIFF")
        vessels = blocks(h, w, [0, 255], seed + n)
        yy, xx = np.mgrid[:h, :w]
        inside = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 2.2) ** 2  # a round field of view
        for path, values in ((os.path.join(base, "1st_manual", f"{key}_manual1.gif"), vessels),
                             (os.path.join(base, "mask", f"{key}_{folder}_mask.gif"), np.where(inside, 255, 0))):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(values.astype(np.uint8), mode="L").save(path)
        expected[key] = np.where(inside, vessels // 255, 255).astype(np.uint8)
    return expected
