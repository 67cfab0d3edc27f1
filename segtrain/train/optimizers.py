"""Optimizers and learning-rate schedules: registry kinds, picked by name in gin.

    optimizer.name = 'sgd'              # registry.OPTIMIZERS: 'sgd', 'adam', 'adamw', or a plugin's
    optimizers.sgd.momentum = 0.9       # the optimizer's own settings
    learning_rate.base = 0.007
    learning_rate.schedule = 'poly'     # registry.SCHEDULES: 'constant', 'poly', 'cosine', or a plugin's
    schedules.poly.power = 0.9          # the schedule's own settings
    learning_rate.warmup_steps = 500    # linear warm-up before any schedule

Contracts: an optimizer plugin is ``fn(learning_rate, **settings) -> keras.optimizers.Optimizer``;
a schedule plugin is ``fn(base, decay_steps, **settings)`` returning a keras
LearningRateSchedule or any callable from the step (a tensor) to the rate, for the steps after
the warm-up. Gradient clipping is done by the
training loop (``train.clip_norm``) after gradients are summed over replicas, so optimizers do
not set it.
"""

from __future__ import annotations

import gin
import keras
import tensorflow as tf

from registry import OPTIMIZERS, SCHEDULES, RegistryError
from segtrain.errors import SegtrainError, warn

# ---- schedules ------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="segtrain")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Rises linearly from peak/warmup_steps to ``peak`` over ``warmup_steps``, then ``after``.

    ``after`` is called with the step count since the end of the warm-up.
    """

    def __init__(self, after, warmup_steps: int, peak: float):
        self.after = after
        self.warmup_steps = warmup_steps
        self.peak = peak

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / float(self.warmup_steps)
        return tf.where(step < self.warmup_steps, warm, self.after(tf.maximum(step - self.warmup_steps, 0.0)))

    def get_config(self):
        return {"after": keras.saving.serialize_keras_object(self.after), "warmup_steps": self.warmup_steps,
                "peak": self.peak}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["after"]), config["warmup_steps"], config["peak"])


@keras.saving.register_keras_serializable(package="segtrain")
class Constant(keras.optimizers.schedules.LearningRateSchedule):
    """The same rate at every step."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, step):
        return tf.constant(self.value, tf.float32)

    def get_config(self):
        return {"value": self.value}


class Scaled(keras.optimizers.schedules.LearningRateSchedule):
    """Another schedule times a variable factor: how ``train.on_nan = 'restore'`` lowers the rate.

    The factor is a variable, so the compiled step reads its current value.
    """

    def __init__(self, schedule, factor: tf.Variable):
        self.schedule, self.factor = schedule, factor

    def __call__(self, step):
        return self.schedule(step) * tf.cast(self.factor, tf.float32)

    def get_config(self):
        return {}


class StepFunction(keras.optimizers.schedules.LearningRateSchedule):
    """A plugin schedule's plain ``fn(step) -> rate``, as the LearningRateSchedule Keras expects."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, step):
        return tf.cast(self.fn(tf.cast(step, tf.float32)), tf.float32)

    def get_config(self):
        return {}


@SCHEDULES.register("constant")
def constant(base: float, decay_steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """The base rate at every step."""
    return Constant(base)


@SCHEDULES.register("poly")
def poly(base: float, decay_steps: int, end: float = 0.0, power: float = 0.9):
    """DeepLab's poly decay: base * (1 - t/T)^power, down to ``end``.

    Args:
      end: the final rate.
      power: the exponent (0.9 in DeepLab).
    """
    return keras.optimizers.schedules.PolynomialDecay(base, decay_steps, end, power=power)


@SCHEDULES.register("cosine")
def cosine(base: float, decay_steps: int, end: float = 0.0):
    """Half a cosine from base down to ``end``.

    Args:
      end: the final rate.
    """
    return keras.optimizers.schedules.CosineDecay(base, decay_steps, alpha=end / base if base else 0.0)


@gin.configurable("learning_rate", denylist=["total_steps"])
def learning_rate_schedule(
    total_steps: int,
    base: float = 1e-3,
    schedule: str = "constant",
    warmup_steps: int = 0,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate as a function of the step.

    Args:
      total_steps: steps of the whole run (train.num_steps).
      base: the peak learning rate.
      schedule: a registered schedule ('constant', 'poly', 'cosine'); its own settings are
        under schedules.<name>.*.
      warmup_steps: linear warm-up steps before the schedule starts; a warm-up longer than the
        run is shortened to the run, with a warning (a smoke test of a long experiment runs).

    Raises:
      SegtrainError: an unknown schedule or a negative warm-up.
    """
    try:
        schedule_fn = SCHEDULES.get(schedule)
    except RegistryError as e:
        raise SegtrainError(f"learning_rate.schedule: {e}") from None
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise SegtrainError(f"learning_rate.warmup_steps={warmup_steps!r} must be an integer >= 0.")
    if warmup_steps > total_steps:
        warn(f"learning_rate.warmup_steps={warmup_steps} is longer than train.num_steps={total_steps}: "
             f"warming up over all {total_steps} steps.")
        warmup_steps = total_steps
    fn = schedule_fn(base=base, decay_steps=max(total_steps - warmup_steps, 1))
    if not isinstance(fn, keras.optimizers.schedules.LearningRateSchedule):
        if not callable(fn):
            raise SegtrainError(f"Schedule plugin {schedule!r} returned {type(fn).__name__}, not a callable of the step.")
        fn = StepFunction(fn)
    return LinearWarmup(fn, warmup_steps, base) if warmup_steps else fn


# ---- optimizers -----------------------------------------------------------------------------


@OPTIMIZERS.register("sgd")
def sgd(learning_rate, momentum: float = 0.9, nesterov: bool = False, weight_decay: float | None = None):
    """SGD with momentum.

    Args:
      momentum, nesterov: as keras.optimizers.SGD.
      weight_decay: decoupled weight decay, or None.
    """
    return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def adam(learning_rate, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7,
         weight_decay: float | None = None):
    """Adam.

    Args:
      beta_1, beta_2, epsilon: as keras.optimizers.Adam.
      weight_decay: decoupled weight decay, or None.
    """
    return keras.optimizers.Adam(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                                 weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(learning_rate, weight_decay: float = 0.004, beta_1: float = 0.9, beta_2: float = 0.999,
          epsilon: float = 1e-7):
    """AdamW: Adam with decoupled weight decay.

    Args:
      weight_decay: the decoupled weight decay.
      beta_1, beta_2, epsilon: as keras.optimizers.AdamW.
    """
    return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2,
                                  epsilon=epsilon)


@gin.configurable("optimizer", denylist=["total_steps", "precision", "lr_factor", "model"])
def build_optimizer(total_steps: int, precision: str = "float32", name: str = "adam",
                    lr_factor: tf.Variable | None = None, model: keras.Model | None = None,
                    lr_multipliers: dict | None = None, layer_decay: float | None = None,
                    freeze_backbone_steps: int = 0, decay_norm_and_bias: bool = False) -> keras.optimizers.Optimizer:
    """The configured optimizer on the ``learning_rate`` schedule, with loss scaling for float16.

    Args:
      total_steps: steps of the whole run, for the schedule.
      precision: the run's precision; 'mixed_float16' wraps the optimizer in Keras 3's
        LossScaleOptimizer (dynamic scale; a step with non-finite gradients is skipped and
        the scale halves).
      lr_factor: a variable the schedule's rate is multiplied by (None: none).
      model: the model trained (for the settings below that pick its parts).
      name: a registered optimizer ('sgd', 'adam', 'adamw'); its own settings are under
        optimizers.<name>.*.
      lr_multipliers: part -> multiplier of the learning rate (and of the weight decay, which
        Keras scales by the rate), e.g. ``{'backbone': 0.1}`` (a pretrained encoder at a tenth of
        the head's rate, as the DeepLab papers' 10x head rate). 'backbone' is the model's
        nested backbone, 'head' the rest; any other key is a regular expression searched in the
        variable's path ('decoder'). The first matching key applies.
      layer_decay: layer-wise learning-rate decay of the backbone (0.65-0.9 for transformers):
        its last stage's rate is multiplied by ``layer_decay``, the one before by its square,
        and so on down to the stem; None: off.
      freeze_backbone_steps: the backbone does not change during the first N steps (its rate
        and weight decay are 0; its batch norm statistics still adapt unless
        backbones.<name>.freeze_batch_norm), then trains at its rate.
      decay_norm_and_bias: weight decay also on the scales and offsets of normalisation
        layers and on biases; off by default, as the reference recipes do.

    Raises:
      SegtrainError: an unknown optimizer, or settings that need a backbone the model lacks.
    """
    try:
        optimizer_fn = OPTIMIZERS.get(name)
    except RegistryError as e:
        raise SegtrainError(f"optimizer.name: {e}") from None
    schedule = learning_rate_schedule(total_steps)
    optimizer = optimizer_fn(learning_rate=schedule if lr_factor is None else Scaled(schedule, lr_factor))
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise SegtrainError(f"Optimizer plugin {name!r} returned {type(optimizer).__name__}, not a "
                            f"keras.optimizers.Optimizer.")
    if model is not None:
        if not decay_norm_and_bias and optimizer.weight_decay:
            optimizer.exclude_from_weight_decay(var_list=norm_and_bias(model))
        multipliers = part_multipliers(model, lr_multipliers or {}, layer_decay)
        frozen = backbone_variables(model, "optimizer.freeze_backbone_steps") if freeze_backbone_steps else []
        if multipliers or frozen:
            partwise(optimizer, multipliers, frozen, freeze_backbone_steps)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


# ---- fine-tuning: learning rates per part, no decay on norms and biases, a frozen start ----


def norm_and_bias(model: keras.Model) -> list:
    """The trainable scales and offsets of every normalisation layer and every bias."""
    from segtrain.models.model import leaf_layers

    norms = (keras.layers.BatchNormalization, keras.layers.LayerNormalization, keras.layers.GroupNormalization)
    found = []
    for layer in leaf_layers(model):
        for variable in layer.trainable_weights:
            if isinstance(layer, norms) or variable.name == "bias" or variable.path.endswith("/bias"):
                found.append(variable)
    return found


def backbone_variables(model: keras.Model, setting: str) -> list:
    try:
        return list(model.get_layer("backbone").trainable_weights)
    except ValueError:
        raise SegtrainError(f"{setting}: model {model.name!r} has no nested 'backbone' (a model built on a "
                            f"registered backbone has one).") from None


def part_multipliers(model: keras.Model, multipliers: dict, layer_decay: float | None) -> list:
    """[(variable, learning-rate multiplier)] of the variables whose multiplier is not 1."""
    import re

    from segtrain.models.model import leaf_layers

    backbone = {id(v) for v in backbone_variables(model, "optimizer.lr_multipliers['backbone']")} \
        if "backbone" in multipliers or layer_decay else set()
    found = {}
    for variable in model.trainable_weights:
        for key, value in multipliers.items():
            if key == "backbone":
                hit = id(variable) in backbone
            elif key == "head":
                hit = id(variable) not in backbone
            else:
                hit = re.search(key, variable.path) is not None
            if hit:
                found[id(variable)] = float(value)
                break
    if layer_decay:
        layers = model.get_layer("backbone")
        strides = dict(getattr(layers, "layer_strides", ()))
        if not strides:
            raise SegtrainError("optimizer.layer_decay: the model's backbone does not say which stage each layer is "
                                "in (a registered backbone does).")
        stages = sorted({strides[layer.name] for layer in leaf_layers(layers) if layer.trainable_weights})
        for layer in leaf_layers(layers):
            depth = len(stages) - stages.index(strides[layer.name]) if layer.trainable_weights else 0
            for variable in layer.trainable_weights:
                found[id(variable)] = found.get(id(variable), 1.0) * float(layer_decay) ** depth
    return [(v, found[id(v)]) for v in model.trainable_weights if found.get(id(v), 1.0) != 1.0]


class _Partwise:
    """Mixed into an optimizer's class: per-variable learning-rate multipliers and a frozen start.

    Keras' TF optimizers call ``update_step(gradient, variable, learning_rate)`` per variable
    (per replica under a strategy) and decay weights by ``learning_rate * weight_decay``: both
    take the variable's multiplier here.
    """

    def _segtrain_factor(self, variable):
        key = self._var_key(variable)
        factor = self._segtrain_multipliers.get(key, 1.0)
        if key in self._segtrain_frozen:
            frozen = tf.cast(self.iterations < self._segtrain_frozen_steps, tf.float32)
            return (1.0 - frozen) * factor
        return factor if factor != 1.0 else None

    def update_step(self, gradient, variable, learning_rate):
        factor = self._segtrain_factor(variable)
        if factor is not None:
            learning_rate = tf.cast(learning_rate, variable.dtype) * tf.cast(factor, variable.dtype)
        return super().update_step(gradient, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return

        def apply(distribution, variables):
            def decay(variable):
                if self._use_weight_decay(variable):
                    factor = self._segtrain_factor(variable)
                    lr = tf.cast(self.learning_rate, variable.dtype)
                    if factor is not None:
                        lr = lr * tf.cast(factor, variable.dtype)
                    variable.assign_sub(variable * tf.cast(self.weight_decay, variable.dtype) * lr)

            for variable in variables:
                if isinstance(variable, keras.Variable):  # its tf.Variable, as Keras' own decay does
                    variable = variable.value
                distribution.extended.update(variable, decay, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(apply, self._distribution_strategy, variables)


def partwise(optimizer: keras.optimizers.Optimizer, multipliers: list, frozen: list, frozen_steps: int) -> None:
    """Makes ``optimizer`` apply ``multipliers`` ([(variable, factor)]) and keep ``frozen`` (variables)
    unchanged for its first ``frozen_steps`` updates. Before it is built."""
    optimizer._segtrain_multipliers = {optimizer._var_key(v): m for v, m in multipliers}
    optimizer._segtrain_frozen = {optimizer._var_key(v) for v in frozen}
    optimizer._segtrain_frozen_steps = int(frozen_steps)
    base = type(optimizer)
    optimizer.__class__ = type(f"Partwise{base.__name__}", (_Partwise, base), {})


def loss_scaling(optimizer: keras.optimizers.Optimizer) -> bool:
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def loss_scale(optimizer: keras.optimizers.Optimizer) -> float | None:
    """The current dynamic loss scale, or None without loss scaling."""
    if loss_scaling(optimizer):
        return float(tf.convert_to_tensor(optimizer.dynamic_scale))
    return None


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate of the optimizer's next step."""
    # tf.convert_to_tensor: a constant rate is a MirroredVariable under MirroredStrategy.
    return float(tf.convert_to_tensor(optimizer.learning_rate))
