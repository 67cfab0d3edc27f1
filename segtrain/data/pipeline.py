"""The input pipeline every dataset shares: augment, normalise, batch, prefetch.

Dataset plugins yield {'image': uint8 [H,W,3], 'label': uint8 [H,W]} (images of other bands:
uint8 or uint16 [H,W,C], as DatasetInfo.channels and image_dtype say); everything after that
happens here. The experiment configures it in gin under ``pipeline.*`` and tells it what the
model needs (its size divisor and input normalisation).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import tensorflow as tf

from segtrain.data import service, transforms
from segtrain.data.info import DatasetInfo
from segtrain.errors import SegtrainError

@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The user's settings of the shared input pipeline (gin scope ``pipeline``), checked when made.

    Attributes:
      resize: (height, width) every image is resized to first, or None.
      min_scale, max_scale: random rescaling range (training).
      crop_size: (height, width) of training crops; needed unless ``resize`` fixes the size.
      flip: random left-right flip (training).
      brightness: max additive brightness change on [0, 1] images (e.g. 0.1).
      contrast, saturation: (lower, upper) random factor ranges, e.g. (0.8, 1.2).
      hue: max hue shift (e.g. 0.1).
      mean, std: per-channel normalisation on the [0, 255] scale, RGB order (images of other
        bands: one per band, on their stored scale); set, they replace ``normalization``.
      rgb_channels: images of other bands than RGB: the three bands (0-based) that hold red,
        green and blue. Colour jitter changes those alone, and a pretrained model's RGB kernels
        go to them (segtrain.models.model.with_input_channels); None: no colour jitter.
      eval_size: (height, width) evaluation images are resized to, or None for full size (labels
        are never resized: the logits are resized back to them).
      shuffle_buffer: examples in the shuffle buffer (training).
      cache: cache the decoded examples in memory (small datasets).
      check_labels: fail on a label that is neither a class nor the ignore label.
      deterministic: keep the training examples' order fixed for a seed. Off by default: the
        parallel map then hands on whichever example is ready first, which keeps the cores busy.
        The augmentation of each example is the same either way.
      data_service_address: 'grpc://host:port' of a tf.data service dispatcher (`segtrain
        data-service`): its workers make the training batches (segtrain.data.service).
      colour_on_device: leave colour jitter and normalisation of training batches to the
        training step (``transforms.finish_batch``), on the accelerator: the pipeline then hands
        over uint8 crops and labels (a quarter of the bytes; the resized crop is rounded to whole
        levels) and each image's colour draws under 'colour'. Evaluation is unchanged.
    """

    resize: Sequence[int] | None = None
    min_scale: float = 1.0
    max_scale: float = 1.0
    crop_size: Sequence[int] | None = None
    flip: bool = True
    brightness: float = 0.0
    contrast: Sequence[float] | None = None
    saturation: Sequence[float] | None = None
    hue: float = 0.0
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    rgb_channels: Sequence[int] | None = None
    eval_size: Sequence[int] | None = None
    shuffle_buffer: int = 1024
    cache: bool = False
    check_labels: bool = True
    deterministic: bool = False
    data_service_address: str | None = None
    colour_on_device: bool = False

    def __post_init__(self):
        def bad(field: str, what: str):
            raise SegtrainError(f"pipeline.{field} must be {what}, got {getattr(self, field)!r}.")

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        for field in ("resize", "crop_size", "eval_size"):
            value = getattr(self, field)
            if value is not None:
                if (not isinstance(value, (list, tuple)) or len(value) != 2
                        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
                    bad(field, "None or (height, width), two integers >= 1")
                object.__setattr__(self, field, tuple(value))
        for field in ("mean", "std"):
            value = getattr(self, field)
            if value is not None:
                if (not isinstance(value, (list, tuple)) or not value or not all(map(number, value))
                        or (field == "std" and min(value) <= 0)):
                    bad(field, "None or one number per channel (R, G, B on the 0-255 scale)"
                        + (", each > 0" if field == "std" else ""))
                object.__setattr__(self, field, tuple(float(v) for v in value))
        for field in ("contrast", "saturation"):
            value = getattr(self, field)
            if value is not None:
                if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(map(number, value))
                        or not 0 <= value[0] <= value[1]):
                    bad(field, "None or a (lower, upper) factor range, 0 <= lower <= upper, e.g. (0.8, 1.2)")
                object.__setattr__(self, field, tuple(float(v) for v in value))
        if self.rgb_channels is not None:
            value = self.rgb_channels
            if (not isinstance(value, (list, tuple)) or len(value) != 3 or len(set(value)) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
                bad("rgb_channels", "None or three different band indices >= 0 (red, green, blue), e.g. (2, 1, 0)")
            object.__setattr__(self, "rgb_channels", tuple(value))
        if not number(self.min_scale) or self.min_scale <= 0:
            bad("min_scale", "a number > 0")
        if not number(self.max_scale) or self.max_scale < self.min_scale:
            bad("max_scale", f"a number >= pipeline.min_scale ({self.min_scale})")
        if not number(self.brightness) or self.brightness < 0:
            bad("brightness", "a number >= 0")
        if not number(self.hue) or not 0 <= self.hue <= 0.5:
            bad("hue", "a number in [0, 0.5]")
        buffer = self.shuffle_buffer
        if not isinstance(buffer, int) or isinstance(buffer, bool) or buffer < 1:
            bad("shuffle_buffer", "an integer >= 1")
        for field in ("flip", "cache", "check_labels", "deterministic", "colour_on_device"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "True or False")
        if self.data_service_address is not None and not isinstance(self.data_service_address, str):
            bad("data_service_address", "None or 'grpc://host:port'")


def build_pipeline(
    dataset: tf.data.Dataset,
    info: DatasetInfo,
    split: str,
    training: bool,
    batch_size: int,
    size_divisor: int = 1,
    seed: int = 0,
    input_context: tf.distribute.InputContext | None = None,
    normalization: transforms.Normalization | None = None,
    run: str | None = None,
    settings: PipelineConfig | None = None,
    **overrides,
) -> tf.data.Dataset:
    """Turns a plugin's dataset into batches of {'image': float32, 'label': int32}.

    (With ``colour_on_device``, training batches are {'image': uint8, 'label': uint8,
    'colour': {name: [batch] float32}} for ``transforms.finish_batch``.)

    Training: [shard per worker], shuffle, repeat forever, then one parallel map: [decode],
    [resize], random scale, random crop (labels padded with the ignore label), flip, colour
    jitter, normalise; batch with drop_remainder. Datasets that yield encoded examples (files,
    prepared datasets) are shuffled and sharded while still encoded and decoded in that map.
    Resize, scale and crop are drawn first, as one region of the source image: only that
    region is decoded (where the dataset's ``decode_region`` can) and resized.
    Evaluation:
    [resize the image to eval_size], normalise, pad to a multiple of the model's ``size_divisor``
    (labels padded with the ignore label), batch images of one padded size together (any sizes
    with eval_size, which resizes them to one). Labels keep their original size, so
    metrics are computed at full resolution; each example also carries 'image_size' and
    'label_size' (height, width before padding) for the evaluation to map logits back.

    Args:
      dataset, info, split: what the dataset plugin returned, and the split's name.
      training: training (augmented, infinite) or evaluation (one pass) pipeline.
      batch_size: global batch size.
      size_divisor: the model needs height and width divisible by this.
      seed: seed of shuffling and augmentation.
      input_context: training under ``distribute_datasets_from_function``: this worker's
        pipeline reads only its shard of the examples, and batches per replica.
      normalization: what the model expects (its backbone weights' preprocessing); default:
        ImageNet mean and std in RGB order.
      run: the training run (its model_dir), which names its tf.data service job.
      settings: the user's settings (gin: ``pipeline.*``); default: PipelineConfig().
      **overrides: fields of ``settings`` to replace (``crop_size=(64, 64)``).

    Raises:
      SegtrainError: sizes that cannot work with the model or the batch size.
    """
    config = dataclasses.replace(settings or PipelineConfig(), **overrides)
    ignore = info.ignore_label
    where = f"dataset '{info.name}' split '{split}'"
    num_examples = info.num_examples.get(split)
    normalize = resolve_normalization(normalization, config.mean, config.std)
    fill = normalize.fill
    colour = any((config.brightness, config.contrast, config.hue, config.saturation))
    if info.rgb and (len(normalize.mean) != 3 or len(normalize.std) != 3):
        raise SegtrainError(f"pipeline.mean and pipeline.std need three numbers each (R, G, B) for {where}'s RGB "
                            f"images, got {len(normalize.mean)} and {len(normalize.std)}.")
    if not info.rgb:
        bands = f"{where}'s images have {info.channels} band(s) of {info.image_dtype}"
        if len(normalize.mean) != info.channels or len(normalize.std) != info.channels:
            raise SegtrainError(f"{bands}, but the normalisation has {len(normalize.mean)} means and "
                                f"{len(normalize.std)} deviations: set pipeline.mean and pipeline.std to one "
                                f"number per band.")
        if training and config.colour_on_device:
            raise SegtrainError(f"{bands}: pipeline.colour_on_device hands over 8-bit RGB crops only; turn it off.")
        if training and colour and config.rgb_channels is None:
            raise SegtrainError(f"{bands}: colour jitter (pipeline.brightness, contrast, saturation, hue) needs to "
                                f"know which three are red, green and blue: set pipeline.rgb_channels (e.g. "
                                f"(0, 1, 2)), or turn the colour jitter off.")
        if config.rgb_channels and max(config.rgb_channels) >= info.channels:
            raise SegtrainError(f"pipeline.rgb_channels={config.rgb_channels}: {bands} (0..{info.channels - 1}).")

    global_batch, pipelines, pipeline_id = batch_size, 1, 0
    if training and input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        if not config.data_service_address:  # with the service, every worker builds one job's pipeline
            pipelines, pipeline_id = input_context.num_input_pipelines, input_context.input_pipeline_id
            seed = seed + 7919 * pipeline_id  # every worker its own shuffling and augmentation draws
    if training:
        if num_examples is not None and num_examples < global_batch:
            raise SegtrainError(
                f"train.batch_size={global_batch} is larger than {where} ({num_examples} "
                f"examples): lower train.batch_size or use a larger split."
            )
        fixed = config.crop_size or config.resize
        if fixed is None:
            raise SegtrainError(
                "Training batches need one image size: set pipeline.crop_size (or pipeline.resize)."
            )
        if size_divisor > 1 and (fixed[0] % size_divisor or fixed[1] % size_divisor):
            name = "pipeline.crop_size" if config.crop_size else "pipeline.resize"
            raise SegtrainError(
                f"{name}={tuple(fixed)} does not suit the model: its height and width must be "
                f"multiples of {size_divisor}."
            )

    def prepare(ex):
        # Images stay uint8 until a resize or the colour steps need float; labels stay uint8.
        if info.decode is not None:
            ex = info.decode(ex)
        image, label = ex["image"], tf.cast(ex["label"], tf.uint8)
        if config.check_labels and not info.labels_checked:
            label = transforms.check_labels(label, info.num_classes, ignore, where, info.multilabel)
        return image, label

    # A region's label cannot be checked whole: labels to check are decoded whole.
    by_region = (info.decode is not None and info.decode_region is not None
                 and (info.labels_checked or not config.check_labels))

    def augment(index, ex):
        seeds = tf.unstack(tf.random.experimental.stateless_split(tf.stack([tf.constant(seed, tf.int64), index]), 4))

        def draw(image_size):  # resize, random scale and crop as one region of the source image
            return transforms.random_region(image_size, seeds[0], seeds[1], config.resize, config.min_scale,
                                            config.max_scale, config.crop_size)

        if by_region:
            # Encoded examples are decoded inside the region only: what the crop keeps.
            drawn = []

            def choose(image_size):
                drawn.append(draw(image_size))
                return drawn[0].offset, drawn[0].extent

            ex = info.decode_region(ex, choose)
            image, label, region = ex["image"], tf.cast(ex["label"], tf.uint8), drawn[0]
        else:
            image, label = prepare(ex)
            region = draw(tf.shape(image)[:2])
            image, label = transforms.take_region(image, label, region)
        mirror = tf.random.stateless_uniform([], seeds[2]) < 0.5 if config.flip else None
        image, label = transforms.resize_region(image, label, region.size, mirror, config.crop_size, ignore,
                                                fill)
        if config.colour_on_device:  # the training step jitters and normalises (transforms.finish_batch)
            out = {"image": tf.cast(tf.round(image), tf.uint8), "label": label}
            draws = transforms.colour_draws(seeds[3], config.brightness, config.contrast, config.hue,
                                            config.saturation)
            return {**out, "colour": draws} if draws else out
        if info.rgb:
            image = transforms.jitter_and_normalize(image, seeds[3], normalize, config.brightness,
                                                    config.contrast, config.hue, config.saturation)
        else:
            image = transforms.jitter_bands_and_normalize(image, seeds[3], normalize, config.rgb_channels,
                                                          config.brightness, config.contrast, config.hue,
                                                          config.saturation)
        return {"image": image, "label": tf.cast(label, tf.int32)}

    def evaluate(ex):
        image, label = prepare(ex)
        out = {"label_size": tf.shape(label)[:2]}
        if config.eval_size:
            # The model sees the resized image; metrics stay at the label's own size (the
            # evaluation resizes the logits back), so the label is left as it is.
            image = tf.image.resize(image, config.eval_size, method="bilinear")
        image = normalize(image)
        out["image_size"] = tf.shape(image)[:2]
        if size_divisor > 1:
            image, padded_label = transforms.pad_to_multiple(image, label, size_divisor, ignore)
            if not config.eval_size:
                label = padded_label
        return {**out, "image": image, "label": tf.cast(label, tf.int32)}

    options = tf.data.Options()
    options.deterministic = True
    if pipelines > 1:
        # Sharded here, before decoding: each worker decodes only its own examples. (The DATA
        # auto-shard policy would decode and augment every example on every worker, then drop
        # most of them.)
        dataset = dataset.shard(pipelines, pipeline_id)
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    elif dataset.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.AUTO:
        # Generated datasets have no files to split between workers: each worker keeps every
        # n-th element (tf.distribute would try files first, fail and fall back, with a warning).
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = dataset.with_options(options)
    if config.cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(config.shuffle_buffer, num_examples or config.shuffle_buffer), seed=seed)
        ds = ds.repeat().enumerate()
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=config.deterministic)
        ds = ds.batch(batch_size, drop_remainder=True)
        if config.data_service_address:
            job = service.job_name(info.name, split, global_batch, batch_size, seed, run)
            ds = service.distribute(ds, config.data_service_address, job, where)
    else:
        if num_examples and ds.cardinality() == tf.data.UNKNOWN_CARDINALITY:  # for the progress line
            ds = ds.apply(tf.data.experimental.assert_cardinality(num_examples))
        ds = ds.map(evaluate, num_parallel_calls=tf.data.AUTOTUNE)
        padding = {"image": 0.0, "label": ignore, "image_size": 0, "label_size": 0}
        if config.eval_size or batch_size == 1:
            ds = ds.padded_batch(batch_size, padding_values=padding)
        else:
            # Images of one padded size per batch. Padded further to a larger image of its batch,
            # an image's border would see that padding through the convolutions, and its logits
            # would depend on which images it was batched with: the metrics would not be those
            # of the model run on each image alone, as predict, export and a server run it.
            ds = ds.group_by_window(
                key_func=lambda ex: tf.cast(tf.shape(ex["image"])[0], tf.int64) * 2**20 + tf.cast(
                    tf.shape(ex["image"])[1], tf.int64),
                reduce_func=lambda _, window: window.padded_batch(batch_size, padding_values=padding),
                window_size=batch_size)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    if not training and num_examples:
        ds.num_examples = int(num_examples)  # the batches' count is unknown: progress counts images
    return ds


def resolve_normalization(normalization: transforms.Normalization | None, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None) -> transforms.Normalization:
    """``pipeline.mean``/``std`` when set (RGB order), else the model's, else the default."""
    if mean is None and std is None:
        return normalization or transforms.Normalization()
    default = transforms.Normalization()
    return transforms.Normalization(tuple(mean or default.mean), tuple(std or default.std))
