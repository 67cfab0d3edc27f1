"""The experiment: what every command builds from the gin configuration, and nothing more.

``Experiment`` turns the ``train.*`` bindings (the experiment's gin scope: ``train.model``,
``train.dataset``, ...) into the dataset's facts, the model, the loss, the metrics and the input
pipelines, the way TF Model Garden's Task does. It builds no optimizer and reads only the
splits it is asked for: `segtrain evaluate` (and every command that uses a trained model)
restores the model's weights alone into it. Training (segtrain.train) adds the optimizer, the
step counter and the checkpoints on top.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import gin
import keras
import numpy as np
import tensorflow as tf

from registry import DATASETS, LOSSES, METRICS, MODELS
from segtrain.data.files import damaged_data
from segtrain.data.info import DatasetInfo
from segtrain.data.pipeline import PipelineConfig, build_pipeline, resolve_normalization
from segtrain.data.transforms import Normalization, finish_batch, preprocessing
from segtrain.data.verify import is_damaged_read
from segtrain.errors import SegtrainError, warn
from segtrain.evaluation import Evaluator
from segtrain.inference import Inference, InferenceOptions
from segtrain.losses import ClassStatistics, build_loss
from segtrain.metrics import DEFAULT_METRICS
from segtrain.models.model import ModelFacts, facts, synchronize_batch_norm, with_input_channels
from segtrain.precision import PRECISIONS, set_precision
from segtrain.task import Task
from segtrain.run_dir import BEST_DIR, DamagedCheckpoint, diagnose, is_damage, problem, readable_others, resolve


# The shared input pipeline's settings, configured in gin under pipeline.*; the experiment passes the rest.
configured_pipeline = gin.external_configurable(PipelineConfig, name="pipeline")


@gin.configurable("inference")
def inference_options(mode: str = "whole", crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None,
                      scales: Sequence[float] = (1.0,), flip: bool = False, threshold: float = 0.5,
                      temperature: float = 1.0) -> InferenceOptions:
    """How evaluation and every command that uses a trained model run it (gin scope ``inference``).

    Args:
      mode: 'whole' images at once, or 'slide': windows of crop_size every stride.
      crop_size: (height, width) of the sliding windows.
      stride: (height, width) step between windows (default: two thirds of crop_size).
      scales: test-time scales; the softmax of every scale (and flip) is averaged.
      flip: also infer on the left-right flipped image.
      threshold: multi-label (and binary) datasets: a label is predicted where its probability
        exceeds this; in evaluation, predict and export alike.
      temperature: probabilities are those of logits / temperature: temperature scaling, fitted by
        `segtrain evaluate --calibrate` into the run's calibration.json and applied by
        predict and export with --calibrated (segtrain.failures). Argmax predictions do not change.
    """
    return InferenceOptions(mode, crop_size, stride, tuple(scales) if not isinstance(scales, (int, float)) else
                            (scales,), flip, threshold, temperature)


@gin.configurable("train")
@dataclasses.dataclass
class ExperimentConfig:
    """The experiment (gin scope ``train``): which plugins, how long, how to evaluate and save.

    Attributes:
      model, loss, dataset: registry names of the plugins.
      metrics: registry names of the metrics computed at evaluation.
      num_steps: optimizer steps of the whole run.
      batch_size: global batch size (over all replicas).
      eval_every: evaluate on ``eval_split`` every this many steps (0: only at the end).
      eval_split: split evaluated during training.
      eval_batch_size: evaluation batch size (default: batch_size).
      steps_per_loop: steps per tf.function call; more cuts host overhead, fewer logs more often.
      checkpoint_every: save a checkpoint every this many steps (default: eval_every).
      keep_checkpoints: latest checkpoints kept.
      best_metric: the metric that decides the best checkpoint and early stopping.
      best_mode: 'max' or 'min' ('auto': 'min' for loss, else 'max').
      early_stopping_patience: stop after this many evaluations without improvement (0: never).
      min_delta: smallest change of best_metric that counts as an improvement.
      clip_norm: clip the global gradient norm (after summing over replicas) to this, or None.
      num_image_panels: validation examples shown in TensorBoard's image panels.
      seed: seed of weight initialisation, shuffling and augmentation.
      train_split: split trained on.
      precision: 'float32', 'mixed_float16' (dynamic loss scaling) or 'mixed_bfloat16'.
      xla: compile each replica's forward and backward pass with XLA (jit_compile=True).
      synchronized_batch_norm: every batch norm of the model (backbone, encoder, decoder,
        head) computes its batch statistics over the global batch, with an all-reduce per layer
        per step, instead of each replica over its own share. For small per-replica batches.
      accumulation_steps: micro-batches per optimizer update; each replica's share of
        batch_size is split into this many, their gradients summed, and one update applied.
      on_nan: what a NaN or infinite loss does: 'stop' (an error; the last good checkpoint
        stays) or 'restore' (reload the last good checkpoint, scale the learning rate by
        nan_lr_factor, go on with the next batches).
      max_nan_restores: restores a run may make; the next NaN after that stops it.
      nan_lr_factor: what each restore multiplies the learning rate by.
      on_damaged_checkpoint: a latest checkpoint that does not read (files cut short, changed
        or missing) at a resume: 'fallback' to the newest one that reads (the damaged ones
        moved to model_dir/damaged/), or 'stop' with a message.
      preemption_grace: seconds the scheduler leaves between SIGTERM and SIGKILL; a run
        warns when its windows (steps_per_loop steps) take longer than that to end.
      drop_actions: names of actions the run leaves out (segtrain.train.trainer.Trainer.build_actions
        lists them; e.g. ('image_panels',)).
      trackers: experiment trackers that log the run beside TensorBoard, on the chief:
        'mlflow', 'wandb' (segtrain.train.trackers; their settings are trackers.mlflow.* and
        trackers.wandb.*).
      profile_steps: (A, B): trace training steps A..B (1-based, inclusive) with the TensorFlow
        profiler into model_dir/train for TensorBoard's Profile tab (None: off); see
        segtrain.train.profiler.
    """

    model: str = "unet"
    loss: str = "cross_entropy"
    dataset: str = "shapes"
    metrics: Sequence[str] = DEFAULT_METRICS
    num_steps: int = 1000
    batch_size: int = 8
    eval_every: int = 500
    eval_split: str = "validation"
    eval_batch_size: int | None = None
    steps_per_loop: int = 10
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    best_metric: str = "mean_iou"
    best_mode: str = "auto"
    early_stopping_patience: int = 0
    min_delta: float = 0.0
    clip_norm: float | None = None
    num_image_panels: int = 3
    seed: int = 0
    train_split: str = "train"
    precision: str = "float32"
    xla: bool = False
    synchronized_batch_norm: bool = False
    accumulation_steps: int = 1
    on_nan: str = "stop"
    max_nan_restores: int = 3
    nan_lr_factor: float = 0.5
    on_damaged_checkpoint: str = "fallback"
    preemption_grace: float = 30.0
    profile_steps: Sequence[int] | None = None
    drop_actions: Sequence[str] = ()
    trackers: Sequence[str] = ()

    def __post_init__(self):
        def check(field, ok, what, kinds=(int,)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
                raise SegtrainError(f"train.{field} must be {what}, got {value!r}.")

        for field in ("num_steps", "batch_size", "steps_per_loop", "keep_checkpoints", "accumulation_steps"):
            check(field, lambda v: v >= 1, "an integer >= 1")
        for field in ("eval_every", "early_stopping_patience", "num_image_panels", "max_nan_restores"):
            check(field, lambda v: v >= 0, "an integer >= 0")
        if self.checkpoint_every is not None:
            check("checkpoint_every", lambda v: v >= 1, "None or an integer >= 1")
        if self.clip_norm is not None:
            check("clip_norm", lambda v: v > 0, "None or a number > 0", (int, float))
        check("min_delta", lambda v: v >= 0, "a number >= 0", (int, float))
        check("nan_lr_factor", lambda v: 0 < v <= 1, "a number in (0, 1]", (int, float))
        check("preemption_grace", lambda v: v > 0, "a number of seconds > 0", (int, float))
        if self.profile_steps is not None:
            steps = self.profile_steps
            if (not isinstance(steps, (list, tuple)) or len(steps) != 2
                    or any(isinstance(s, bool) or not isinstance(s, int) for s in steps)
                    or not 1 <= steps[0] <= steps[1]):
                raise SegtrainError(
                    f"--profile_steps (train.profile_steps) must be the first and last training step to "
                    f"profile, two integers A,B with 1 <= A <= B, e.g. --profile_steps=20,30 (gin: "
                    f"train.profile_steps = (20, 30)); got {steps!r}.")
            self.profile_steps = tuple(steps)
        if isinstance(self.drop_actions, str) or not all(isinstance(n, str) for n in self.drop_actions):
            raise SegtrainError(f"train.drop_actions must be a list of action names, e.g. ('image_panels',); got "
                                f"{self.drop_actions!r}.")
        if isinstance(self.trackers, str) or not all(t in ("mlflow", "wandb") for t in self.trackers):
            raise SegtrainError(f"train.trackers must be a list of 'mlflow' and/or 'wandb', e.g. ('mlflow',); got "
                                f"{self.trackers!r}.")
        if self.on_nan not in ("stop", "restore"):
            raise SegtrainError(f"train.on_nan={self.on_nan!r}: use 'stop' or 'restore'.")
        if self.on_damaged_checkpoint not in ("fallback", "stop"):
            raise SegtrainError(f"train.on_damaged_checkpoint={self.on_damaged_checkpoint!r}: use 'fallback' or 'stop'.")
        if self.precision not in PRECISIONS:
            raise SegtrainError(f"train.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}.")
        for field in ("xla", "synchronized_batch_norm"):
            if not isinstance(getattr(self, field), bool):
                raise SegtrainError(f"train.{field} must be True or False, got {getattr(self, field)!r}.")
        if self.best_mode not in ("auto", "max", "min"):
            raise SegtrainError(f"train.best_mode={self.best_mode!r}: use 'auto', 'max' or 'min'.")
        for name in self.metrics:
            METRICS.get(name)
        if self.best_metric != "loss":
            if self.best_metric not in self.metrics:
                raise SegtrainError(
                    f"train.best_metric={self.best_metric!r} is not among train.metrics "
                    f"{list(self.metrics)} (or 'loss')."
                )
            if np.ndim(METRICS.get(self.best_metric)(np.eye(2, dtype=np.int64))) != 0:
                raise SegtrainError(
                    f"train.best_metric={self.best_metric!r} is a per-class metric: pick a scalar "
                    f"one such as 'mean_iou' (or 'loss')."
                )

    @property
    def mode(self) -> str:
        """'max' or 'min': which way best_metric improves."""
        if self.best_mode != "auto":
            return self.best_mode
        return "min" if self.best_metric == "loss" else "max"


class Experiment:
    """The dataset's facts, model, loss, metrics and pipelines of the configured experiment.

    Everything is built on first use, so a command pays only for what it uses.

    Args:
      config: the experiment (default: from the ``train.*`` gin bindings).
      strategy: the tf.distribute strategy the model lives in (default: the current one).
      split: the split whose DatasetInfo (classes, ignore label) the model is built for; the
        evaluated split by default, the training split for training.
    """

    def __init__(self, config: ExperimentConfig | None = None, strategy: tf.distribute.Strategy | None = None,
                 split: str | None = None):
        self.config = config or ExperimentConfig()
        self.strategy = strategy or tf.distribute.get_strategy()
        self.split = split or self.config.eval_split
        self.metric_names = tuple(self.config.metrics)
        # Resolve every plugin name now: a typo fails before any work.
        self._dataset_fn = DATASETS.get(self.config.dataset)
        self._reads: dict[str, tuple[tf.data.Dataset, DatasetInfo]] = {}
        self._model_fn = MODELS.get(self.config.model)
        self._loss_factory = LOSSES.get(self.config.loss)

    def damaged_data(self, error: BaseException, splits: Sequence[str]) -> str | None:
        """When reading ``splits`` failed with ``error``: the message naming the damaged shard
        files of the prepared dataset and how to rebuild it, or None if that is not the cause."""
        if not is_damaged_read(error):
            return None
        name = self.config.dataset
        return damaged_data(DATASETS.original(name), splits, gin.get_bindings(f"datasets.{name}"))

    def read(self, split: str) -> tuple[tf.data.Dataset, DatasetInfo]:
        """What the dataset plugin returns for ``split``: examples (maybe encoded) and facts.

        Read once per split: the facts and the pipeline of a split share one dataset object
        (a tf.data graph is reused, not consumed), so a plugin that traces its own ops, as
        `shapes` does, pays for that once.
        """
        if split not in self._reads:
            self._reads[split] = self._dataset_fn(split=split)
        return self._reads[split]

    @functools.cached_property
    def info(self) -> DatasetInfo:
        return self.read(self.split)[1]

    @functools.cached_property
    def task(self) -> Task:
        """What the labels and the model's outputs mean, at the configured ``inference.threshold``."""
        options = inference_options()
        return Task.of(self.info, options.threshold, options.temperature)

    @functools.cached_property
    def loss_fn(self):
        """The loss. A factory that takes ``class_statistics`` (class weights from the data) gets
        the training split's pixel counts per class, which `segtrain prepare` records."""
        info, split = self.info, self.config.train_split
        statistics = ClassStatistics(
            class_names=tuple(info.class_names),
            pixel_counts=info.class_pixel_counts.get(split),
            image_pixels=info.class_image_pixels.get(split),
            split=split,
            dataset=self.config.dataset,
        )
        return build_loss(self.config.loss, info.ignore_label, statistics, multilabel=info.multilabel,
                          dataset=self.config.dataset)

    @functools.cached_property
    def model(self) -> keras.Model:
        """The model, built under the strategy at the configured precision and seed."""
        # Every experiment sets the policy, float32 included, so one run's precision never leaks
        # into the next one built in the same process.
        set_precision(self.config.precision)
        keras.utils.set_random_seed(self.config.seed)
        info = self.info
        with self.strategy.scope():
            model = self._model_fn(num_classes=info.num_classes)
            if not model.built:  # a subclassed model makes its variables on the first call
                divisor = facts(model).size_divisor
                side = divisor * -(-64 // divisor)
                model(tf.zeros([1, side, side, 3]), training=False)
            if not info.rgb:  # bands: the convolutions that read the image extended to them
                model = with_input_channels(model, info.channels, self.pipeline_config.rgb_channels)
        if self.config.synchronized_batch_norm:  # every batch norm, a backbone's included
            synchronize_batch_norm(model)
        return model

    @property
    def facts(self) -> ModelFacts:
        return facts(self.model)

    @functools.cached_property
    def normalization(self) -> Normalization:
        """The input normalisation: the model's weights' preprocessing, unless pipeline.mean/std
        are set; images of other bands than 8-bit RGB: the training split's mean and std per
        band, as `segtrain prepare` recorded them, unless pipeline.mean/std are set."""
        model_preprocessing = self.facts.preprocessing
        mean, std = self.pipeline_config.mean, self.pipeline_config.std
        info = self.info
        if not info.rgb:
            split = self.config.train_split
            mean = mean if mean is not None else info.channel_mean.get(split)
            std = std if std is not None else info.channel_std.get(split)
            if mean is None or std is None:
                raise SegtrainError(
                    f"Dataset '{self.config.dataset}' has images of {info.channels} band(s) of {info.image_dtype}: "
                    f"their normalisation needs each band's mean and std. Prepare the dataset (`segtrain prepare` "
                    f"records them for split '{split}'), or set pipeline.mean and pipeline.std (one number per band, "
                    f"on the stored scale).")
            if len(mean) != info.channels or len(std) != info.channels:
                raise SegtrainError(f"pipeline.mean/std have {len(mean)}/{len(std)} values for dataset "
                                    f"'{self.config.dataset}''s {info.channels} band(s): give one per band.")
            return Normalization(tuple(float(v) for v in mean), tuple(max(float(v), 1e-6) for v in std),
                                 max_value=float(info.max_value))
        if model_preprocessing and (mean is not None or std is not None):
            warn(f"pipeline.mean/std are set, so they replace the '{model_preprocessing}' preprocessing that model "
                 f"'{self.config.model}'s backbone weights expect (with BGR order for 'caffe'). Leave them unset "
                 f"to use the weights' own.")
        return resolve_normalization(preprocessing(model_preprocessing), mean, std)

    @property
    def pipeline_config(self) -> PipelineConfig:
        """The input pipeline's settings (gin: ``pipeline.*``) as gin has them now, checked."""
        return configured_pipeline()

    def _pipeline_args(self) -> dict:
        """The pipeline's settings and normalisation, resolved here once: pipeline.mean/std are
        already in it, so the pipeline gets none of its own to resolve again."""
        return {"normalization": self.normalization,
                "settings": dataclasses.replace(self.pipeline_config, mean=None, std=None)}

    def eval_dataset(self, split: str | None = None, batch_size: int | None = None) -> tf.data.Dataset:
        """One pass over ``split`` (default: the experiment's split) at full resolution."""
        split = split or self.split
        ds, info = self.read(split)
        batch_size = batch_size or self.config.eval_batch_size or self.config.batch_size
        return build_pipeline(ds, info, split, False, batch_size, self.facts.size_divisor, self.config.seed,
                              **self._pipeline_args())

    def train_dataset(self, seed: int, input_context: tf.distribute.InputContext | None = None,
                      run: str | None = None) -> tf.data.Dataset:
        """The training pipeline: global batches, or with ``input_context`` (from
        ``distribute_datasets_from_function``) this worker's shard in per-replica batches.
        ``run`` (the model_dir) names the tf.data service job when pipeline.data_service_address is set."""
        cfg = self.config
        replicas = self.strategy.num_replicas_in_sync
        if cfg.batch_size % replicas:
            raise SegtrainError(
                f"train.batch_size={cfg.batch_size} does not divide over {replicas} replicas: use a "
                f"multiple of {replicas}."
            )
        per_replica, k = cfg.batch_size // replicas, cfg.accumulation_steps
        if per_replica % k:
            raise SegtrainError(
                f"train.batch_size={cfg.batch_size} over {replicas} replica{'s' if replicas > 1 else ''} gives "
                f"{per_replica} examples per replica, which do not split into train.accumulation_steps={k} "
                f"micro-batches: use a train.batch_size that is a multiple of {replicas * k}, or fewer "
                f"accumulation steps."
            )
        ds, info = self.read(cfg.train_split)
        return build_pipeline(ds, info, cfg.train_split, True, cfg.batch_size, self.facts.size_divisor, seed,
                              input_context, run=run, **self._pipeline_args())

    def finish_batch(self, batch: dict) -> tuple[tf.Tensor, tf.Tensor]:
        """A training batch's (model input, int32 labels): what ``pipeline.colour_on_device``
        leaves to the training step (colour jitter, normalisation), inside that step."""
        return finish_batch(batch, self.normalization)

    def inference(self, **overrides) -> Inference:
        """The model's Inference: gin's ``inference.*`` settings, then ``overrides`` that are not None."""
        options = inference_options(**{k: v for k, v in overrides.items() if v is not None})
        return Inference(self.model, self.info.num_classes, self.facts.size_divisor, options, task=self.task)

    def evaluator(self, inference: Inference | None = None) -> Evaluator:
        """The evaluation loop, with ``inference`` (default: ``self.inference()``)."""
        return Evaluator(self.model, self.loss_fn, self.info, self.strategy, self.metric_names,
                         inference=inference or self.inference(), xla=self.config.xla)

    def restore(self, model_dir: str, checkpoint: str = "best") -> tuple[str, int]:
        """Restores the model's weights, and nothing else, from a run's checkpoint.

        Args:
          model_dir: the run's directory.
          checkpoint: 'best' (the latest when no best was kept), 'latest', or one checkpoint of
            the run by name ('ckpt-600', 'best/ckpt-400') or path.

        Returns:
          (the checkpoint's path, its training step).

        Raises:
          SegtrainError: no such checkpoint, one of a different model, or one that does not read
            (what is wrong with it, and the run's checkpoints that do read).
        """
        path = resolve(model_dir, checkpoint)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        try:
            restore_checkpoint(tf.train.Checkpoint(model=self.model, step=step), path, partial=True)
        except DamagedCheckpoint as e:
            others = readable_others(model_dir, path)
            choice = (f"Checkpoints of {model_dir} that read: "
                      + ", ".join(f"{name} (--checkpoint={name})"
                                  for name in others) + "." if others else
                      f"No other checkpoint of {model_dir} reads: restore the files from a copy, or train again.")
            raise SegtrainError(f"{e} {choice}") from None
        return path, int(step.numpy())


def restore_checkpoint(checkpoint: tf.train.Checkpoint, path: str, partial: bool = False) -> None:
    """Restores ``path`` into every object of ``checkpoint``; ``partial``: the file may hold more
    (an optimizer the caller did not build).

    Files missing or unreadable show before anything is read (run_dir.problem); after that,
    TensorFlow checks every tensor it reads against the checksum the checkpoint's index recorded,
    so a restore that succeeds read undamaged data.

    Raises:
      DamagedCheckpoint: the checkpoint's files are missing, cut short or changed.
      SegtrainError: the checkpoint was written by a different model or configuration.
    """
    missing = problem(path)
    if missing:
        raise DamagedCheckpoint(path, missing)
    try:
        status = checkpoint.restore(path)
        if partial:
            status.expect_partial()
        status.assert_existing_objects_matched()
    except (IndexError, tf.errors.OpError) as e:
        if is_damage(e):
            raise DamagedCheckpoint(path, diagnose(path, e)) from None
        if not isinstance(e, (tf.errors.NotFoundError, tf.errors.InvalidArgumentError)):
            raise
        _does_not_fit(path, partial, e)
    except (ValueError, AssertionError) as e:
        _does_not_fit(path, partial, e)


def _does_not_fit(path: str, partial: bool, e: Exception) -> None:
    """Raises the message of a checkpoint written by another model or configuration."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    model_dir = os.path.dirname(path.rstrip("/"))
    if os.path.basename(model_dir) == BEST_DIR:
        model_dir = os.path.dirname(model_dir)
    what = "model" if partial else "model and optimizer"
    raise SegtrainError(
        f"Checkpoint {path} does not fit the {what} configured now: it was written by a "
        f"different model or configuration ({first[:300]}). Use a new --model_dir, or the gin "
        f"configuration the run was trained with ({model_dir}/operative_config.gin)."
    ) from None
