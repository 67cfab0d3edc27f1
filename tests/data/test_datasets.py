"""The file datasets: each layout read exactly, prepared once, read back, and bad input named."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import segtrain.data  # noqa: F401  (registers the datasets)
from registry import DATASETS
from segtrain.data import ade20k, cityscapes, coco_stuff, drive, folder, pets, voc
from segtrain.data.prepare import SKIPPED_FILE, is_prepared, prepare, prepared_dir, read_all
from segtrain.data.raw import Source
from segtrain.errors import SegtrainError, SegtrainWarning
from tests.data import fabricate as F

STEMS = [f"img_{i:02d}" for i in range(20)]


def _plugin(name):
    """The registered dataset function (without gin)."""
    return DATASETS.original(name)


def _decoded(path):
    if path.endswith(".tif"):  # TF does not read TIFF
        return np.asarray(Image.open(path).convert("RGB"))
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()


def _check(ds_info, expected, image_paths):
    ds, info = ds_info
    got = read_all(ds, info)
    assert sorted(g["key"] for g in got) == sorted(expected)
    for g in got:
        np.testing.assert_array_equal(g["label"], expected[g["key"]], err_msg=g["key"])
        np.testing.assert_array_equal(g["image"], _decoded(image_paths[g["key"]]), err_msg=g["key"])
    return info


def _prepare(source, raw, out, **kw):
    kw.setdefault("num_workers", 1)
    return prepare(source, str(raw), str(out), **kw)


# name, fabricate(raw) -> {split: {key: label}}, plugin, Source, image path of a key
def _voc(raw):
    splits = {"train": ["2007_000032", "2007_000039", "2008_000001"], "val": ["2007_000063", "2009_000010"]}
    labels = F.voc(raw, splits)
    split_labels = {s: {k: labels[k] for k in ids} for s, ids in splits.items()}
    split_labels["trainval"] = {k: labels[k] for k in splits["train"] + splits["val"]}
    return split_labels, lambda k: os.path.join(raw, "VOCdevkit", "VOC2012", "JPEGImages", f"{k}.jpg")


def _pets(raw):
    splits = {"trainval": ["Abyssinian_1", "beagle_12", "Bengal_3"], "test": ["pug_7", "Sphynx_2"]}
    labels = F.pets(raw, splits)
    return ({s: {k: labels[k] for k in ids} for s, ids in splits.items()},
            lambda k: os.path.join(raw, "images", f"{k}.jpg"))


def _cityscapes(raw):
    splits = {"train": ["aachen_000000_000019", "bochum_000000_000313", "aachen_000001_000019"],
              "val": ["frankfurt_000000_000294"], "test": ["berlin_000000_000019"]}
    labels = F.cityscapes(raw, splits)
    by_split = {s: {f"{k.split('_')[0]}/{k}": labels[f"{k.split('_')[0]}/{k}"] for k in ids} for s, ids in splits.items()}

    def image_path(key):
        city, stem = key.split("/")
        split = next(s for s, ids in splits.items() if stem in ids)
        return os.path.join(raw, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png")

    return by_split, image_path


def _by_split(labels, splits):
    return {s: {k: labels[k] for k in keys} for s, keys in splits.items()}


def _ade20k(raw):
    splits = {"train": ["ADE_train_00000001", "ADE_train_00000002"], "val": ["ADE_val_00000001"]}
    folders = {"train": "training", "val": "validation"}
    split_of = {k: s for s, keys in splits.items() for k in keys}
    return (_by_split(F.ade20k(raw, splits), splits), lambda k: os.path.join(
        raw, "ADEChallengeData2016", "images", folders[split_of[k]], f"{k}.jpg"))


def _coco_stuff(raw):
    splits = {"train": ["000000000009", "000000000025"], "val": ["000000000139"]}
    split_of = {k: s for s, keys in splits.items() for k in keys}
    return (_by_split(F.coco_stuff(raw, splits), splits),
            lambda k: os.path.join(raw, "dataset", "images", f"{split_of[k]}2017", f"{k}.jpg"))


def _drive(raw):
    splits = {"train": ["21", "22"], "test": ["01"]}
    folders = {"train": "training", "test": "test"}
    split_of = {k: s for s, keys in splits.items() for k in keys}
    return (_by_split(F.drive(raw, splits), splits), lambda k: os.path.join(
        raw, "DRIVE", folders[split_of[k]], "images", f"{k}_{folders[split_of[k]]}.tif"))


def _folder(raw, rgb=False):
    labels = F.folder(raw, STEMS, num_classes=3, rgb=rgb)
    source = folder.Folder(num_classes=3)
    by_split = {s: {k: v for k, v in labels.items() if source.split_of(k) == s} for s in source.splits}
    return by_split, lambda k: os.path.join(raw, "images", f"{k}.jpg")


def _folder_multilabel(raw, layout):
    labels = F.folder_multilabel(raw, STEMS[:12], layout)
    source = folder.Folder(class_names=("a", "b", "c"), labels=layout)
    by_split = {s: {k: v for k, v in labels.items() if source.split_of(k) == s} for s in source.splits}
    return by_split, lambda k: os.path.join(raw, "images", f"{k}.png")


def _multilabel_layout(layout):
    config = {"class_names": ("a", "b", "c"), "labels": layout}
    return (lambda raw: _folder_multilabel(raw, layout), _plugin("folder"), lambda: folder.Folder(**config), config)


LAYOUTS = {
    "voc2012": (_voc, _plugin("voc2012"), voc.Voc2012, {}),
    "oxford_iiit_pet": (_pets, _plugin("oxford_iiit_pet"), pets.OxfordIiitPet, {}),
    "cityscapes": (_cityscapes, _plugin("cityscapes"), cityscapes.Cityscapes, {}),
    "ade20k": (_ade20k, _plugin("ade20k"), ade20k.Ade20k, {}),
    "coco_stuff": (_coco_stuff, _plugin("coco_stuff"), coco_stuff.CocoStuff, {}),
    "drive": (_drive, _plugin("drive"), drive.Drive, {}),
    "folder_index": (_folder, _plugin("folder"), lambda: folder.Folder(num_classes=3), {"num_classes": 3}),
    "folder_rgb": (lambda raw: _folder(raw, rgb=True), _plugin("folder"),
                   lambda: folder.Folder(num_classes=3, ignore_colour=(255, 255, 255)),
                   {"num_classes": 3, "ignore_colour": (255, 255, 255)}),
    # Multi-label masks: bits in one PNG, one channel per label, one mask file per label.
    "folder_bits": _multilabel_layout("bits"),
    "folder_channels": _multilabel_layout("channels"),
    "folder_masks": _multilabel_layout("masks"),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_prepared_and_raw_reading_give_the_exact_labels(tmp_path, name):
    fabricate, plugin, make_source, config = LAYOUTS[name]
    raw, out = tmp_path / "raw", tmp_path / "out"
    expected, image_path = fabricate(str(raw))
    result = _prepare(make_source(), raw, out)
    assert result["splits"] == {s: len(v) for s, v in expected.items()}
    for split, labels in expected.items():
        paths = {k: image_path(k) for k in labels}
        info = _check(plugin(split, data_dir=str(out)), labels, paths)
        assert info.num_examples[split] == len(labels)
        raw_info = _check(plugin(split, source_dir=str(raw), **config), labels, paths)
        assert (info.num_classes, info.class_names, tuple(info.palette), info.multilabel) == (
            raw_info.num_classes, tuple(raw_info.class_names), tuple(raw_info.palette), raw_info.multilabel)
        assert info.multilabel == name.startswith(("folder_bits", "folder_channels", "folder_masks"))


def test_class_tables():
    assert voc.Voc2012().num_classes == 21 and voc.CLASS_NAMES[15] == "person"
    assert voc.PALETTE[1] == (128, 0, 0) and voc.PALETTE[15] == (192, 128, 128)
    lut = cityscapes.label_id_to_train_id()
    assert len(cityscapes.TRAIN_CLASSES) == 19
    assert [int(lut[i]) for i in (0, 6, 7, 8, 9, 26, 29, 33)] == [255, 255, 0, 1, 255, 13, 255, 18]
    assert lut[34] == -1
    assert ade20k.Ade20k().num_classes == 150 and ade20k.CLASS_NAMES[12] == "person"
    ade = ade20k.Ade20k().label_lut()
    assert [int(ade[v]) for v in (0, 1, 13, 150, 151)] == [255, 0, 12, 149, -1]
    stuff = coco_stuff.CocoStuff()
    assert stuff.num_classes == 171 and len(set(stuff.class_names)) == 171
    assert (stuff.class_names[0], stuff.class_names[79], stuff.class_names[80], stuff.class_names[170]) == (
        "person", "toothbrush", "banner", "wood")
    coco = coco_stuff.map_value_to_class()
    # stop sign (COCO id 13, map value 12) follows the unannotated street sign; banner (id 92) is class 80.
    assert [int(coco[v]) for v in (0, 10, 11, 12, 91, 181, 182, 255)] == [0, 10, -1, 11, 80, 170, -1, 255]
    assert drive.Drive().class_names == ("background", "vessel")


def test_bad_values_of_the_benchmark_layouts_are_named(tmp_path):
    raw = tmp_path / "raw"
    _coco_stuff(str(raw))
    Image.fromarray(np.full((20, 24), 11, np.uint8), "L").save(raw / "dataset" / "annotations" / "train2017" / "000000000009.png")
    with pytest.raises(SegtrainError, match=r"000000000009.png: label values 11 are not COCO-Stuff map values 0..181 "
                                            r"\(less the unannotated thing ids 11, 25"):
        _prepare(coco_stuff.CocoStuff(), raw, tmp_path / "out")
    raw = tmp_path / "drive"
    _drive(str(raw))
    os.remove(raw / "DRIVE" / "training" / "mask" / "22_training_mask.gif")
    with pytest.raises(SegtrainError, match=r"22_training.tif: no .*22_training_mask.gif"):
        _prepare(drive.Drive(), raw, tmp_path / "out")
    shutil.rmtree(raw / "DRIVE" / "test" / "1st_manual")
    with pytest.raises(SegtrainError, match=r"test/1st_manual for split 'test' does not exist \(a DRIVE copy without "
                                            r"the test annotations: prepare the train split alone with --splits=train\)"):
        _prepare(drive.Drive(), raw, tmp_path / "out")


def test_pets_boundary_as_ignore(tmp_path):
    expected, _ = _pets(str(tmp_path / "raw"))
    _prepare(pets.OxfordIiitPet(), tmp_path / "raw", tmp_path / "out")
    ds, info = _plugin("oxford_iiit_pet")("test", data_dir=str(tmp_path / "out"), boundary_as_ignore=True)
    assert info.num_classes == 2 and info.class_names == ("pet", "background")
    for got in read_all(ds, info):
        want = expected["test"][got["key"]].copy()
        want[want == 2] = 255
        np.testing.assert_array_equal(got["label"], want)


@pytest.mark.parametrize("lists", [True, False], ids=["sbd_release", "sbd_pngs"])
def test_voc2012_aug_train_is_sbd_plus_voc_train_minus_val(tmp_path, lists):
    raw = str(tmp_path / "raw")
    voc_labels = F.voc(raw, {"train": ["2007_000032", "2007_000039"], "val": ["2007_000063", "2009_000010"]})
    # SBD covers one VOC train image, one VOC val image (which must stay out) and two others.
    sbd_ids = ["2007_000032", "2007_000063", "2008_000100", "2008_000200"]
    sbd_labels = F.sbd(str(tmp_path / "sbd"), sbd_ids, raw, lists=lists)
    sbd_dir = str(tmp_path / "sbd" / "benchmark_RELEASE" / "dataset")
    if not lists:  # a folder of converted class-index PNGs instead of the .mat release
        sbd_dir = str(tmp_path / "SegmentationClassAug")
        os.makedirs(sbd_dir)
        for key, label in sbd_labels.items():
            Image.fromarray(label, mode="L").save(os.path.join(sbd_dir, f"{key}.png"))
    source = voc.Voc2012Aug(sbd_dir)
    _prepare(source, raw, tmp_path / "out")
    ds, info = _plugin("voc2012_aug")("train", data_dir=str(tmp_path / "out"))
    got = {g["key"]: g["label"] for g in read_all(ds, info)}
    assert sorted(got) == ["2007_000032", "2007_000039", "2008_000100", "2008_000200"]
    np.testing.assert_array_equal(got["2007_000032"], voc_labels["2007_000032"])  # VOC's own annotation wins
    np.testing.assert_array_equal(got["2008_000100"], sbd_labels["2008_000100"])
    ds, info = _plugin("voc2012_aug")("val", data_dir=str(tmp_path / "out"))
    assert sorted(g["key"] for g in read_all(ds, info)) == ["2007_000063", "2009_000010"]


def test_folder_splits_by_hash_or_by_lists(tmp_path):
    raw = tmp_path / "raw"
    F.folder(str(raw), STEMS)
    source = folder.Folder(num_classes=3, split_ratios=(0.5, 0.25, 0.25))
    splits = {s: [e.key for e in source.list_split(str(raw), s)[0]] for s in source.splits}
    assert sorted(sum(splits.values(), [])) == STEMS and all(splits.values())
    # The split of a stem depends on the stem alone: a second folder with more files agrees.
    F.folder(str(tmp_path / "more"), STEMS + ["zz_new_1", "zz_new_2"])
    more = {s: [e.key for e in source.list_split(str(tmp_path / "more"), s)[0]] for s in source.splits}
    assert all(set(splits[s]) <= set(more[s]) for s in splits)
    os.makedirs(raw / "splits")
    for split, stems in (("train", STEMS[:15]), ("val", STEMS[15:18]), ("test", STEMS[18:])):
        F.write_lines(str(raw / "splits" / f"{split}.txt"), stems)
    assert [e.key for e in source.list_split(str(raw), "val")[0]] == STEMS[15:18]
    os.remove(raw / "splits" / "test.txt")
    with pytest.raises(SegtrainError, match=r"split list .*splits/test.txt for split 'test' does not exist"):
        source.list_split(str(raw), "test")


# -- bad input ----------------------------------------------------------------------------------

def _pets_tree(tmp_path):
    raw = tmp_path / "raw"
    _pets(str(raw))
    return raw


def _trimap(raw, key):
    return raw / "annotations" / "trimaps" / f"{key}.png"


BAD = {
    "image_without_mask": (lambda raw: os.remove(_trimap(raw, "beagle_12")), "beagle_12.jpg: no label file"),
    "mask_without_image": (lambda raw: os.remove(raw / "images" / "Bengal_3.jpg"), "Bengal_3.png: no image"),
    "corrupt_jpeg": (lambda raw: (raw / "images" / "pug_7.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg"),
                     "pug_7.jpg: corrupt or truncated image file"),
    "truncated_jpeg": (lambda raw: open(raw / "images" / "pug_7.jpg", "r+b").truncate(200),
                       "pug_7.jpg: corrupt or truncated image file"),
    "truncated_png": (lambda raw: open(_trimap(raw, "Sphynx_2"), "r+b").truncate(60),
                      "Sphynx_2.png: corrupt or truncated label file"),
    "mask_size_differs": (lambda raw: Image.new("L", (5, 7), 1).save(_trimap(raw, "Abyssinian_1")),
                          "Abyssinian_1.png: label is 5x7 (width x height) but its image Abyssinian_1.jpg is"),
    "mask_value_outside": (lambda raw: Image.fromarray(np.full((24, 30), 9, np.uint8), "L").save(
        _trimap(raw, "Abyssinian_1")), "Abyssinian_1.png: label values 9 are not trimap values 1 (pet)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_example_stops_prepare_with_its_file_and_skip_leaves_it_out(tmp_path, case):
    raw, out = _pets_tree(tmp_path), tmp_path / "out"
    damage, message = BAD[case]
    damage(raw)
    with pytest.raises(SegtrainError) as e:
        _prepare(pets.OxfordIiitPet(), raw, out)
    assert message in str(e.value) and "1 bad example(s)" in str(e.value) and "--skip_bad_examples" in str(e.value)
    assert not is_prepared(str(out), pets.OxfordIiitPet())
    result = _prepare(pets.OxfordIiitPet(), raw, out, skip_bad_examples=True)
    assert len(result["skipped"]) == 1 and sum(result["splits"].values()) == 4
    listed = (tmp_path / "out" / "oxford_iiit_pet" / "1.0.0" / SKIPPED_FILE).read_text()
    assert message in listed
    ds, info = _plugin("oxford_iiit_pet")("trainval", data_dir=str(out))
    assert len(read_all(ds, info)) == info.num_examples["trainval"]


def test_many_bad_examples_are_listed_first_few_then_counted(tmp_path):
    raw = tmp_path / "raw"
    F.folder(str(raw), STEMS)
    for stem in STEMS[:13]:
        (raw / "images" / f"{stem}.jpg").write_bytes(b"broken")
    with pytest.raises(SegtrainError) as e:
        _prepare(folder.Folder(num_classes=3, splits=("train",), split_ratios=(1,)), raw, tmp_path / "out")
    text = str(e.value)
    assert "13 bad example(s)" in text and "... and 3 more" in text and text.count("corrupt or truncated") == 10


def test_rgb_colour_not_in_palette(tmp_path):
    raw = tmp_path / "raw"
    F.folder(str(raw), STEMS[:4], rgb=True)  # white is the ignore colour, and not declared here
    mask = np.asarray(Image.open(raw / "masks" / f"{STEMS[0]}.png")).copy()
    mask[0, 0] = (1, 2, 3)
    Image.fromarray(mask).save(raw / "masks" / f"{STEMS[0]}.png")
    source = folder.Folder(num_classes=3, splits=("train",), split_ratios=(1,))
    with pytest.raises(SegtrainError, match=r"img_00.png: mask colours \(1, 2, 3\), \(255, 255, 255\) are not in"):
        _prepare(source, raw, tmp_path / "out")


def test_index_mask_value_outside_the_classes(tmp_path):
    raw = tmp_path / "raw"
    F.folder(str(raw), STEMS[:4], num_classes=5)
    with pytest.raises(SegtrainError, match=r"label values 3, 4 are neither class ids 0..2 nor the ignore label 255"):
        _prepare(folder.Folder(num_classes=3, splits=("train",), split_ratios=(1,)), raw, tmp_path / "out")


def test_missing_directory_split_list_and_empty_split(tmp_path):
    source = pets.OxfordIiitPet()
    with pytest.raises(SegtrainError, match=r"source directory .*/nowhere does not exist\. Expected images/"):
        _prepare(source, tmp_path / "nowhere", tmp_path / "out")
    raw = _pets_tree(tmp_path)
    os.remove(raw / "annotations" / "test.txt")
    with pytest.raises(SegtrainError, match=r"split list .*annotations/test.txt for split 'test' does not exist"):
        _prepare(source, raw, tmp_path / "out")
    (raw / "annotations" / "test.txt").write_text("\n")
    with pytest.raises(SegtrainError, match=r"split 'test' is empty"):
        _prepare(source, raw, tmp_path / "out")
    shutil.rmtree(raw / "images")
    with pytest.raises(SegtrainError, match=r"is not the expected layout \(looked for .*images"):
        _prepare(source, raw, tmp_path / "out")


def test_reading_needs_a_directory_and_a_prepared_copy(tmp_path):
    with pytest.raises(SegtrainError, match=r"set datasets.voc2012.data_dir .* or datasets.voc2012.source_dir"):
        _plugin("voc2012")("train")
    with pytest.raises(SegtrainError, match=r"No prepared voc2012 dataset .* run `segtrain prepare --dataset=voc2012"):
        _plugin("voc2012")("train", data_dir=str(tmp_path))
    with pytest.raises(SegtrainError, match=r"Dataset 'voc2012' has no split 'test'; use one of train, val, trainval"):
        _plugin("voc2012")("test", data_dir=str(tmp_path))


def test_raw_reading_names_a_bad_label_file(tmp_path):
    raw = _pets_tree(tmp_path)
    Image.new("L", (5, 7), 1).save(_trimap(raw, "pug_7"))
    ds, info = _plugin("oxford_iiit_pet")("test", source_dir=str(raw))
    from segtrain.errors import data_errors

    with pytest.raises(SegtrainError, match=r"pug_7.png: label is 5x7 \(width x height\) but its image .*pug_7.jpg"):
        with data_errors():
            read_all(ds, info)


def test_interrupted_prepare_leaves_nothing_and_runs_again(tmp_path, monkeypatch):
    from segtrain.data import prepare as module

    raw, out = _pets_tree(tmp_path), tmp_path / "out"
    source = pets.OxfordIiitPet()

    def interrupt(split, done):
        if split == "test":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(module, "after_example", interrupt)
        _prepare(source, raw, out)
    monkeypatch.undo()
    assert not is_prepared(str(out), source)
    assert not [p for p in out.rglob("*") if p.is_file()], "no file of the half-written dataset may remain"
    with pytest.raises(SegtrainError, match="No prepared oxford_iiit_pet dataset"):
        _plugin("oxford_iiit_pet")("trainval", data_dir=str(out))
    assert _prepare(source, raw, out)["splits"] == {"trainval": 3, "test": 2}
    assert _prepare(source, raw, out)["splits"] == {}, "a prepared dataset is kept, not rebuilt"
    assert _prepare(source, raw, out, overwrite=True)["splits"] == {"trainval": 3, "test": 2}
    assert is_prepared(str(out), source) and os.path.isdir(prepared_dir(str(out), source))


def test_one_registration_gives_reading_and_preparing(tmp_path):
    """A Source subclass decorated once is a dataset plugin whose settings (its arguments) serve
    `segtrain prepare` and reading alike."""
    import inspect

    from segtrain.data.files import file_dataset
    from segtrain.data.info import default_palette
    from segtrain.data.raw import pair_by_stem
    from tests.conftest import segtrain_main

    @file_dataset
    class TwoFolders(Source):
        """Images and masks side by side: <stem>.jpg and <stem><mask_suffix>.png (a test layout)."""

        name = "test_two_folders"
        splits = ("train",)
        layout = "Expected <stem>.jpg and <stem><mask_suffix>.png."

        def __init__(self, num_classes: int = 3, mask_suffix: str = "_mask"):
            self.class_names = tuple(f"c{i}" for i in range(num_classes))
            self.palette = default_palette(num_classes)
            self.mask_suffix = mask_suffix

        def list_split(self, source_dir, split):
            files = os.listdir(source_dir)
            images = {f[:-4]: os.path.join(source_dir, f) for f in files if f.endswith(".jpg")}
            masks = {f[: -len(self.mask_suffix) - 4]: os.path.join(source_dir, f) for f in files
                     if f.endswith(self.mask_suffix + ".png")}
            return pair_by_stem(images, masks)

    fn = DATASETS.original("test_two_folders")
    assert list(inspect.signature(fn).parameters) == ["split", "data_dir", "source_dir", "skip_damaged_records",
                                                      "num_classes", "mask_suffix"]
    raw = tmp_path / "raw"
    labels = F.folder(str(tmp_path / "made"), ["a", "b", "c"], num_classes=2)
    raw.mkdir()
    for stem in labels:
        shutil.copy(tmp_path / "made" / "images" / f"{stem}.jpg", raw / f"{stem}.jpg")
        shutil.copy(tmp_path / "made" / "masks" / f"{stem}.png", raw / f"{stem}_m.png")
    done = segtrain_main("prepare", "--dataset=test_two_folders", f"--source_dir={raw}", f"--data_dir={tmp_path / 'out'}",
                         "--num_workers=1", "--gin_param=datasets.test_two_folders.mask_suffix = '_m'",
                         "--gin_param=datasets.test_two_folders.num_classes = 2")
    assert done.returncode == 0, done.stderr
    ds, info = fn("train", data_dir=str(tmp_path / "out"))
    assert info.class_names == ("c0", "c1")
    got = {g["key"]: g["label"] for g in read_all(ds, info)}
    for stem, label in labels.items():
        np.testing.assert_array_equal(got[stem], label)
    with pytest.warns(SegtrainWarning, match="Reading test_two_folders from its raw files"):
        raw_ds, raw_info = fn("train", source_dir=str(raw), num_classes=2, mask_suffix="_m")
    assert sorted(g["key"] for g in read_all(raw_ds, raw_info)) == ["a", "b", "c"]


def test_images_beyond_8_bits_or_3_bands_are_refused_by_name_not_converted(tmp_path):
    """Pillow would clip a 16-bit grey image at 255 and cut 16-bit RGB to its high byte, silently."""
    import tifffile

    raw = tmp_path / "raw"
    F.folder(str(raw), STEMS[:4], size=(18, 22))
    for stem in STEMS[:3]:
        os.remove(raw / "images" / f"{stem}.jpg")
    h = np.asarray(Image.open(raw / "masks" / f"{STEMS[0]}.png")).shape[0]
    Image.fromarray(np.full((h, 22), 1000, np.uint16)).save(raw / "images" / f"{STEMS[0]}.png")
    tifffile.imwrite(raw / "images" / f"{STEMS[1]}.tif", np.full((18 + 1, 22, 3), 1000, np.uint16))
    tifffile.imwrite(raw / "images" / f"{STEMS[2]}.tif", np.zeros((18 + 2, 22, 5), np.uint8),
                     photometric="minisblack", planarconfig="contig")
    source = folder.Folder(num_classes=3, splits=("train",), split_ratios=(1,))
    with pytest.raises(SegtrainError) as e:
        _prepare(source, raw, tmp_path / "out")
    text = str(e.value)
    assert "3 bad example(s)" in text, text
    assert f"{STEMS[0]}.png: a I;16 image (more than 8 bits per sample); segtrain reads images of 8-bit" in text
    assert f"{STEMS[1]}.tif: a RGB;16L image (16 bits per sample)" in text
    assert f"{STEMS[2]}.tif: a TIFF of 5 band(s) of uint8; segtrain reads" in text
    from segtrain.images import read_rgb

    with pytest.raises(SegtrainError, match=r"img_00.png: a I;16 image \(more than 8 bits per sample\); segtrain"):
        read_rgb(str(raw / "images" / f"{STEMS[0]}.png"))
    with pytest.raises(SegtrainError, match=r"img_01.tif: a RGB;16L image \(16 bits per sample\); segtrain"):
        read_rgb(str(raw / "images" / f"{STEMS[1]}.tif"))
    # Read raw, each is refused too, by name (TF decodes the PNG, Pillow the TIFF).
    for ext, write, what in (("png", lambda p: Image.fromarray(np.full((18, 22), 1000, np.uint16)).save(p), "a I;16 image"),
                             ("tif", lambda p: tifffile.imwrite(p, np.full((18, 22, 3), 1000, np.uint16)), "a RGB;16L image")):
        alone = tmp_path / f"alone_{ext}"
        F.folder(str(alone), ["deep"])
        os.remove(alone / "images" / "deep.jpg")
        write(alone / "images" / f"deep.{ext}")
        ds, info = _plugin("folder")("train", source_dir=str(alone), num_classes=3, splits=("train",), split_ratios=(1,))
        with pytest.raises(Exception, match=rf"deep.{ext}:? (is )?{re.escape(what)}"):
            read_all(ds, info)


def test_bad_masks_are_named_a_16_bit_one_and_one_with_more_channels_than_labels(tmp_path):
    """A class mask of 16 bits whose values do not fit in 8, and a multi-label mask with more
    channels than labels: each refused by prepare with its file named."""
    raw = tmp_path / "raw"
    F.folder(str(raw), STEMS[:4], num_classes=3)
    h = np.asarray(Image.open(raw / "masks" / f"{STEMS[1]}.png")).shape[0]
    Image.fromarray(np.full((h, 22), 300, np.uint16)).save(raw / "masks" / f"{STEMS[1]}.png")
    with pytest.raises(SegtrainError, match=rf"{STEMS[1]}.png: label values up to 300 do not fit in 8 bits"):
        _prepare(folder.Folder(num_classes=3, splits=("train",), split_ratios=(1,)), raw, tmp_path / "out")
    multi = tmp_path / "multi"
    F.folder_multilabel(str(multi), STEMS[:4], "channels")  # RGB masks: 3 channels
    with pytest.raises(SegtrainError, match=rf"{STEMS[0]}.png: the mask has 3 channel\(s\) for 2 label\(s\) "
                                            r"\(datasets.folder.labels='channels': one channel per label\)"):
        _prepare(folder.Folder(class_names=("a", "b"), labels="channels", splits=("train",), split_ratios=(1,)),
                 multi, tmp_path / "out2")
