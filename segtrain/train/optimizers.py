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


@gin.configurable("optimizer", denylist=["total_steps", "precision", "lr_factor"])
def build_optimizer(total_steps: int, precision: str = "float32", name: str = "adam",
                    lr_factor: tf.Variable | None = None) -> keras.optimizers.Optimizer:
    """The configured optimizer on the ``learning_rate`` schedule, with loss scaling for float16.

    Args:
      total_steps: steps of the whole run, for the schedule.
      precision: the run's precision; 'mixed_float16' wraps the optimizer in Keras 3's
        LossScaleOptimizer (dynamic scale; a step with non-finite gradients is skipped and
        the scale halves).
      lr_factor: a variable the schedule's rate is multiplied by (None: none).
      name: a registered optimizer ('sgd', 'adam', 'adamw'); its own settings are under
        optimizers.<name>.*.

    Raises:
      SegtrainError: an unknown optimizer.
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
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


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
