"""Optimizers and learning-rate schedules, configured in gin.

``optimizer.name = 'sgd' | 'adam' | 'adamw'`` and ``learning_rate.schedule = 'constant' |
'poly' | 'cosine'`` with an optional linear warm-up (``learning_rate.warmup_steps``).
"""

from __future__ import annotations

import gin
import keras
import tensorflow as tf

from segtrain.errors import SegtrainError

SCHEDULES = ("constant", "poly", "cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")


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
        return {"warmup_steps": self.warmup_steps, "peak": self.peak}


class Constant(keras.optimizers.schedules.LearningRateSchedule):
    """The same rate at every step."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, step):
        return tf.constant(self.value, tf.float32)

    def get_config(self):
        return {"value": self.value}


@gin.configurable("learning_rate", denylist=["total_steps"])
def learning_rate_schedule(
    total_steps: int,
    base: float = 1e-3,
    schedule: str = "constant",
    warmup_steps: int = 0,
    end: float = 0.0,
    power: float = 0.9,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate as a function of the step.

    Args:
      total_steps: steps of the whole run (train.num_steps).
      base: the peak learning rate.
      schedule: 'constant'; 'poly' (DeepLab: base * (1 - t/T)^power down to ``end``);
        'cosine' (half a cosine from base down to ``end``).
      warmup_steps: linear warm-up steps before the schedule starts.
      end: final learning rate of 'poly' and 'cosine'.
      power: exponent of 'poly' (0.9 in DeepLab).
    """
    if schedule not in SCHEDULES:
        raise SegtrainError(
            f"learning_rate.schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}."
        )
    if not 0 <= warmup_steps < max(total_steps, 1):
        raise SegtrainError(
            f"learning_rate.warmup_steps={warmup_steps} must be >= 0 and below train.num_steps={total_steps}."
        )
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        fn = Constant(base)
    elif schedule == "poly":
        fn = keras.optimizers.schedules.PolynomialDecay(base, decay_steps, end, power=power)
    else:
        fn = keras.optimizers.schedules.CosineDecay(base, decay_steps, alpha=end / base if base else 0.0)
    return LinearWarmup(fn, warmup_steps, base) if warmup_steps else fn


@gin.configurable("optimizer", denylist=["total_steps"])
def build_optimizer(
    total_steps: int,
    name: str = "adam",
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float | None = None,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
) -> keras.optimizers.Optimizer:
    """SGD with momentum, Adam or AdamW, on the ``learning_rate`` schedule.

    Gradient clipping is done by the training loop (``train.clip_norm``) after gradients are
    summed over replicas, so it is not set here.

    Args:
      total_steps: steps of the whole run, for the schedule.
      name: 'sgd', 'adam' or 'adamw'.
      momentum, nesterov: SGD settings.
      weight_decay: decoupled weight decay (AdamW default 0.004; SGD/Adam default none).
      beta_1, beta_2, epsilon: Adam/AdamW settings.
    """
    lr = learning_rate_schedule(total_steps)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "adam":
        return keras.optimizers.Adam(lr, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, weight_decay=weight_decay)
    if name == "adamw":
        return keras.optimizers.AdamW(
            lr, weight_decay=0.004 if weight_decay is None else weight_decay,
            beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
        )
    raise SegtrainError(f"optimizer.name={name!r} is unknown; use one of {', '.join(OPTIMIZERS)}.")


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate of the optimizer's next step."""
    # tf.convert_to_tensor: a constant rate is a MirroredVariable under MirroredStrategy.
    return float(tf.convert_to_tensor(optimizer.learning_rate))
