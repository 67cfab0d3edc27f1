"""The shared input pipeline: image and label move together; labels stay class ids."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from segtrain.data.info import DatasetInfo
from segtrain.data.pipeline import PipelineConfig, build_pipeline
from segtrain.errors import SegtrainError, data_errors
from tests.data import stepwise

INFO = DatasetInfo(num_classes=4, name="toy", num_examples={"train": 6, "validation": 5})
MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _coded(n=6, h=37, w=45, seed=0):
    """Images whose red channel encodes the label (label * 60) and green the column: a
    geometric transform that treated image and label differently breaks the code."""
    rng = np.random.default_rng(seed)
    examples = {"image": [], "label": []}
    for _ in range(n):
        label = rng.integers(0, 4, size=(h, w)).astype(np.uint8)
        label = np.kron(label[::8, ::8], np.ones((8, 8), np.uint8))[:h, :w]  # blocks, so resizing keeps them
        image = np.stack([label * 60, np.tile(np.arange(w) * 5, (h, 1)), np.full((h, w), 7)], -1).astype(np.uint8)
        examples["image"].append(image)
        examples["label"].append(label)
    return tf.data.Dataset.from_tensor_slices({k: np.stack(v) for k, v in examples.items()})


def _train_batches(ds, n_batches=3, batch_size=2, **options):
    options.setdefault("deterministic", True)  # tests compare runs batch by batch
    pipe = build_pipeline(ds, INFO, "train", True, batch_size, 1, 0, mean=MEAN, std=STD, **options)
    return [tf.nest.map_structure(lambda v: v.numpy(), b) for b in pipe.take(n_batches)]


def test_crop_flip_scale_keep_image_and_label_aligned():
    batches = _train_batches(_coded(), crop_size=(24, 24), flip=True, min_scale=0.75, max_scale=1.5, n_batches=6)
    flipped = False
    for batch in batches:
        assert batch["image"].shape == (2, 24, 24, 3) and batch["label"].shape == (2, 24, 24)
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        for image, label in zip(batch["image"], batch["label"]):
            valid = label != 255
            # Red encodes the label wherever the label is not padding.
            code = image[..., 0][valid]
            inside = label[valid] * 60.0
            # Bilinear resizing blurs the image at block edges, so compare the class the image
            # codes for (nearest multiple of 60); a misaligned crop or flip mismatches ~75%.
            assert np.mean(np.abs(code - inside) < 30.0) > 0.85
            # The padded (ignore) area of the label is padding in the image too (blue != 7).
            assert np.all(image[..., 2][~valid] != 7)
            green = image[..., 1][valid.all(axis=1)]
            if green.size and (np.diff(green, axis=1) < 0).mean() > 0.5:
                flipped = True
    assert flipped, "some crops should be mirrored"


def test_labels_use_nearest_neighbour_only():
    batches = _train_batches(_coded(), crop_size=(30, 30), min_scale=0.6, max_scale=1.7, n_batches=6)
    values = set()
    for batch in batches:
        values |= set(np.unique(batch["label"]).tolist())
    assert values <= {0, 1, 2, 3, 255}


def test_small_images_are_padded_with_ignore_label():
    batches = _train_batches(_coded(h=20, w=20), crop_size=(32, 32), flip=False)
    label = batches[0]["label"][0]
    assert label.shape == (32, 32)
    assert np.all(label[20:, :] == 255) and np.all(label[:, 20:] == 255)
    assert np.all(label[:20, :20] != 255)


def test_colour_jitter_changes_image_not_label():
    plain = _train_batches(_coded(), crop_size=(24, 24), flip=False)
    jittered = _train_batches(_coded(), crop_size=(24, 24), flip=False, brightness=0.1, contrast=(0.8, 1.2), hue=0.1)
    for p, j in zip(plain, jittered):
        assert np.array_equal(p["label"], j["label"])
        assert not np.allclose(p["image"], j["image"])


def test_same_seed_same_batches():
    a = _train_batches(_coded(), crop_size=(24, 24), min_scale=0.7, max_scale=1.3, hue=0.1)
    b = _train_batches(_coded(), crop_size=(24, 24), min_scale=0.7, max_scale=1.3, hue=0.1)
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])


def test_normalisation():
    pipe = build_pipeline(_coded(), INFO, "validation", False, 1, 1, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))
    image = next(iter(pipe))["image"].numpy()[0]
    assert np.allclose(image[..., 2], (7 - 30) / 5.0)


def test_training_batches_drop_the_remainder_and_repeat():
    pipe = build_pipeline(_coded(n=5), INFO, "train", True, 4, 1, crop_size=(16, 16))
    shapes = [b["image"].shape[0] for b in pipe.take(5)]
    assert shapes == [4] * 5


def test_eval_keeps_full_size_and_pads_to_the_model_divisor():
    ds = _coded(n=5, h=37, w=45)
    pipe = build_pipeline(ds, INFO, "validation", False, 2, 8, mean=MEAN, std=STD)
    batches = list(pipe)
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]
    for b in batches:
        assert b["image"].shape[1:3] == (40, 48)
        label = b["label"].numpy()
        assert np.all(label[:, 37:, :] == 255) and np.all(label[:, :, 45:] == 255)
        assert np.all(label[:, :37, :45] != 255)


def test_eval_batches_hold_images_of_one_padded_size():
    """An image's logits must not depend on which images it is batched with: padded further to
    a larger image of its batch, its border would see that padding through the convolutions."""
    sizes = [(37, 45), (20, 30), (37, 45), (19, 29), (40, 48)]  # padded to 8: 40x48, 24x32, 40x48, 24x32, 40x48
    examples = [next(iter(_coded(n=1, h=h, w=w, seed=i))) for i, (h, w) in enumerate(sizes)]
    ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature={
        "image": tf.TensorSpec([None, None, 3], tf.uint8), "label": tf.TensorSpec([None, None], tf.uint8)})
    pipe = build_pipeline(ds, INFO, "validation", False, 2, 8, mean=MEAN, std=STD)
    batches = list(pipe)
    assert sorted((tuple(b["image"].shape[:3])) for b in batches) == [(1, 40, 48), (2, 24, 32), (2, 40, 48)]
    seen = sorted(tuple(size) for b in batches for size in b["image_size"].numpy().tolist())
    assert seen == sorted(sizes) and pipe.num_examples == 5  # every image once; the progress line's total


def test_batch_larger_than_split_is_a_clear_error():
    with pytest.raises(SegtrainError, match=r"train.batch_size=8 is larger than dataset 'toy' split 'train' \(6 examples\)"):
        build_pipeline(_coded(), INFO, "train", True, 8, 1, crop_size=(16, 16))


def test_crop_size_must_suit_the_model():
    with pytest.raises(SegtrainError, match=r"pipeline.crop_size=\(30, 30\).*multiples of 16"):
        build_pipeline(_coded(), INFO, "train", True, 2, 16, crop_size=(30, 30))


def test_training_needs_a_fixed_size():
    with pytest.raises(SegtrainError, match="pipeline.crop_size"):
        build_pipeline(_coded(), INFO, "train", True, 2, 1)


def test_label_outside_classes_fails_naming_the_value():
    label = np.zeros((8, 8), np.uint8)
    label[2, 3] = 9
    ds = tf.data.Dataset.from_tensors({"image": np.zeros((8, 8, 3), np.uint8), "label": label})
    pipe = build_pipeline(ds, INFO, "validation", False, 1, 1)
    with pytest.raises(SegtrainError) as e, data_errors():
        list(pipe)
    assert str(e.value).startswith(
        "Label value 9 in dataset 'toy' split 'validation' is neither a class id in [0, 3] nor the ignore label 255."
    )


def test_resize_gives_fixed_size_batches_without_a_crop():
    pipe = build_pipeline(_coded(h=37, w=45), INFO, "train", True, 2, 1, resize=(20, 30), flip=False)
    batch = next(iter(pipe))
    assert batch["image"].shape == (2, 20, 30, 3) and batch["label"].shape == (2, 20, 30)
    assert set(np.unique(batch["label"].numpy()).tolist()) <= {0, 1, 2, 3}
    evaluated = next(iter(build_pipeline(_coded(h=37, w=45), INFO, "validation", False, 2, 1, eval_size=(16, 24))))
    assert evaluated["image"].shape == (2, 16, 24, 3)
    # Metrics stay at the label's own size: the label is not resized, its size travels along.
    assert evaluated["label"].shape == (2, 37, 45)
    assert evaluated["label_size"].numpy().tolist() == [[37, 45]] * 2
    assert evaluated["image_size"].numpy().tolist() == [[16, 24]] * 2


def _encoded(n=12, h=20, w=20):
    """Encoded examples (an index): ``decode`` paints the image with index * 10, label 1."""
    def decode(ex):
        value = tf.cast(ex["index"] * 10, tf.uint8)
        return {"image": tf.fill([h, w, 3], value), "label": tf.ones([h, w], tf.uint8)}

    info = DatasetInfo(num_classes=4, name="encoded", num_examples={"train": n}, decode=decode)
    return tf.data.Dataset.from_tensor_slices({"index": tf.range(n, dtype=tf.int64)}), info


def test_each_worker_decodes_only_its_own_shard_in_per_replica_batches():
    ds, info = _encoded()
    seen = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=4)
        pipe = build_pipeline(ds, info, "train", True, 8, 1, 0, context, crop_size=(16, 16), flip=False,
                              mean=MEAN, std=STD)
        assert pipe.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.OFF
        batches = [b["image"].numpy() for b in pipe.take(6)]
        assert all(b.shape == (2, 16, 16, 3) for b in batches)  # global 8 over 4 replicas
        seen.append({int(v) // 10 for b in batches for v in b[:, 0, 0, 0]})
    assert seen[0] == set(range(0, 12, 2)) and seen[1] == set(range(1, 12, 2))


def test_encoded_examples_are_decoded_in_the_map_for_evaluation_too():
    ds, info = _encoded(n=3)
    pipe = build_pipeline(ds, info, "train", False, 2, 8, mean=MEAN, std=STD)
    batches = list(pipe)
    assert [b["image"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["image"].shape[1:3] == (24, 24)  # padded to the size divisor
    assert sorted(float(v) for b in batches for v in b["image"][:, 0, 0, 0]) == [0.0, 10.0, 20.0]


@pytest.mark.parametrize("src,dst", [((37, 45), (20, 30)), ((20, 30), (37, 45)), ((375, 500), (444, 444)), ((7, 9), (7, 9))])
def test_label_resize_takes_the_pixels_tf_nearest_resize_takes(src, dst):
    from segtrain.data import transforms as T

    label = np.random.default_rng(0).integers(0, 256, src).astype(np.uint8)
    want = tf.image.resize(label[..., None], dst, method="nearest")[..., 0].numpy()
    got = T.resize_nearest(tf.constant(label), dst)
    assert got.dtype == tf.uint8
    np.testing.assert_array_equal(got.numpy(), want)


def test_random_crop_covers_every_offset_and_keeps_image_and_label_together():
    image = tf.constant(np.arange(6 * 5, dtype=np.uint8).reshape(6, 5, 1).repeat(3, -1))
    label = tf.constant(np.arange(6 * 5, dtype=np.uint8).reshape(6, 5))
    corners = set()
    for i in range(200):
        crop_image, crop_label = stepwise.random_crop(image, label, tf.constant([i, 7]), (4, 3), 255)
        assert crop_image.dtype == tf.uint8 and crop_label.shape == (4, 3)
        np.testing.assert_array_equal(crop_image.numpy()[..., 0], crop_label.numpy())
        corners.add(int(crop_label[0, 0]))
    assert corners == {r * 5 + c for r in range(3) for c in range(3)}


def _coordinates(n=4, h=45, w=60):
    """Red is the row and green the column of each pixel; the label is f(row, column)."""
    rows, cols = np.mgrid[:h, :w]
    image = np.stack([rows, cols, np.full((h, w), 7)], -1).astype(np.uint8)
    return [image] * n, [_code(rows, cols).astype(np.uint8)] * n


def _code(rows, cols):
    return (rows % 8) * 16 + cols % 16  # class ids 0..127


CODED = DatasetInfo(num_classes=128, name="coded", num_examples={"train": 4})


def _prepared_like(images, labels):
    """Encoded like a prepared dataset (PNG image bytes: lossless, so pixels compare exactly)."""
    from segtrain.data.prepare import decode_prepared, decode_prepared_region

    info = DatasetInfo(num_classes=128, name="coded", num_examples={"train": len(images)}, decode=decode_prepared,
                       decode_region=decode_prepared_region, labels_checked=True)
    ds = tf.data.Dataset.from_tensor_slices({
        "image": [tf.io.encode_png(x).numpy() for x in images],
        "label": [tf.io.encode_png(y[..., None]).numpy() for y in labels],
        "key": [str(i) for i in range(len(images))],
    })
    return ds, info


AUGMENT = dict(crop_size=(32, 40), flip=True, min_scale=0.5, max_scale=1.5, n_batches=8)


def test_label_is_the_image_coordinates_code_after_augmentation_on_both_paths():
    images, labels = _coordinates()
    decoded = tf.data.Dataset.from_tensor_slices({"image": np.stack(images), "label": np.stack(labels)})
    runs = {"decoded": _train_batches_of(decoded, CODED), "by_region": _train_batches_of(*_prepared_like(images, labels))}
    for path, batches in runs.items():
        padded = mirrored = compared = 0
        for batch in batches:
            for image, label in zip(batch["image"], batch["label"]):
                valid = label != 255
                padded += (~valid).sum()
                row, col = image[..., 0][valid], image[..., 1][valid]
                # Bilinear sampling of the coordinates gives the source point; nearest takes the
                # label of the pixel that point falls in (ties at exactly .5 left out).
                clear = (np.abs(row % 1 - 0.5) > 0.01) & (np.abs(col % 1 - 0.5) > 0.01)
                compared += clear.mean() / (2 * AUGMENT["n_batches"])
                np.testing.assert_array_equal(label[valid][clear], _code(np.round(row), np.round(col))[clear], path)
                assert np.all(image[..., 2][~valid] != 7)  # padding in the image where the label is ignore
                mirrored += np.mean(np.diff(image[..., 1], axis=1)[valid[:, 1:] & valid[:, :-1]] < 0) > 0.5
        assert padded and mirrored and compared > 0.7, path  # scales below 32/45 pad; half the crops mirrored
    # The same draws and pixels whether the pipeline decodes whole examples or regions of them.
    for a, b in zip(runs["decoded"], runs["by_region"]):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(a["image"], b["image"], atol=1e-4)


def _train_batches_of(ds, info, n_batches=AUGMENT["n_batches"]):
    options = {k: v for k, v in AUGMENT.items() if k != "n_batches"}
    pipe = build_pipeline(ds, info, "train", True, 2, 1, 0, mean=MEAN, std=STD, deterministic=True, **options)
    return [{k: v.numpy() for k, v in b.items()} for b in pipe.take(n_batches)]


def test_colour_on_device_hands_over_uint8_crops_that_finish_as_the_pipeline_would():
    from segtrain.data import transforms as T

    colour = dict(brightness=0.1, contrast=(0.8, 1.2), hue=0.1, saturation=(0.7, 1.3))
    options = dict(crop_size=(24, 24), flip=True, min_scale=0.6, max_scale=1.5, n_batches=4, **colour)
    host = _train_batches(_coded(), **options)
    device = _train_batches(_coded(), colour_on_device=True, **options)
    normalization = T.Normalization(MEAN, STD)
    for h, d in zip(host, device):
        assert d["image"].dtype == np.uint8 and d["label"].dtype == np.uint8
        assert set(d["colour"]) == {"brightness", "contrast", "hue", "saturation"}
        assert d["colour"]["contrast"].shape == (2,)
        np.testing.assert_array_equal(d["label"], h["label"])
        image, label = T.finish_batch(tf.nest.map_structure(tf.constant, d), normalization)
        np.testing.assert_array_equal(label.numpy(), h["label"])
        # The same draws; the crop is rounded to whole levels before the jitter, not after.
        difference = np.abs(image.numpy() - h["image"])
        assert difference.max() < 2.0 and difference.mean() < 0.5


def test_colour_on_device_without_jitter_has_no_draws():
    batch = _train_batches(_coded(), crop_size=(16, 16), colour_on_device=True, n_batches=1)[0]
    assert set(batch) == {"image", "label"} and batch["image"].dtype == np.uint8


@pytest.mark.parametrize("settings, message", [
    ({"crop_size": (0, 32)}, "pipeline.crop_size must be None or (height, width), two integers >= 1, got (0, 32)."),
    ({"eval_size": (32,)}, "pipeline.eval_size must be None or (height, width)"),
    ({"min_scale": 1.5, "max_scale": 1.0}, "pipeline.max_scale must be a number >= pipeline.min_scale (1.5), got 1.0."),
    ({"std": (58.0, 0.0, 57.0)}, "pipeline.std must be None or one number per channel (R, G, B on the 0-255 scale), "
                                 "each > 0"),
    ({"mean": ()}, "pipeline.mean must be None or one number per channel"),
    ({"rgb_channels": (0, 1, 1)}, "pipeline.rgb_channels must be None or three different band indices"),
    ({"contrast": (1.2, 0.8)}, "pipeline.contrast must be None or a (lower, upper) factor range"),
    ({"hue": 0.7}, "pipeline.hue must be a number in [0, 0.5], got 0.7."),
    ({"shuffle_buffer": 0}, "pipeline.shuffle_buffer must be an integer >= 1, got 0."),
    ({"flip": "yes"}, "pipeline.flip must be True or False, got 'yes'."),
])
def test_pipeline_settings_are_checked_when_made(settings, message):
    """One validated settings object (gin: pipeline.*): a bad value is one message naming the
    binding, before any dataset is read."""
    with pytest.raises(SegtrainError) as e:
        PipelineConfig(**settings)
    assert message in str(e.value)


def test_pipeline_settings_are_normalised_and_overridable():
    config = PipelineConfig(crop_size=[32, 48], mean=[1, 2, 3], contrast=[0.8, 1.2])
    assert config.crop_size == (32, 48) and config.mean == (1.0, 2.0, 3.0) and config.contrast == (0.8, 1.2)
    pipe = build_pipeline(_coded(n=5), INFO, "train", True, 4, 1, settings=config, crop_size=(16, 16), flip=False)
    assert next(iter(pipe))["image"].shape == (4, 16, 16, 3)  # keyword overrides win over the settings
