"""Numeric precision: float32, or mixed float16 / bfloat16 with float32 variables and logits.

The policy is set before a model is built, by every command that builds one. Training adds
loss scaling for float16 (segtrain.train.optimizers).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from segtrain.errors import SegtrainError, warn

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

# Oldest NVIDIA compute capability with fast float16 (Volta) and with bfloat16 (Ampere).
_MIN_CAPABILITY = {"mixed_float16": (7, 0), "mixed_bfloat16": (8, 0)}


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def check_precision(precision: str, gpu_details: list[dict] | None = None, cpu: set[str] | None = None) -> None:
    """Checks that ``precision`` is known and suits the hardware; warns when it will be slow.

    Args:
      precision: 'float32', 'mixed_float16' or 'mixed_bfloat16'.
      gpu_details: tf.config.experimental.get_device_details of each visible GPU (default:
        queried); an empty list means a CPU-only machine.
      cpu: the CPU's feature flags (default: read from /proc/cpuinfo).

    Raises:
      SegtrainError: an unknown precision, or a GPU that cannot compute in it.
    """
    if precision not in PRECISIONS:
        raise SegtrainError(f"--precision={precision!r} is not one of {', '.join(PRECISIONS)}.")
    if precision == "float32":
        return
    if gpu_details is None:
        gpu_details = [tf.config.experimental.get_device_details(g) for g in tf.config.list_physical_devices("GPU")]
    if not gpu_details:
        if precision == "mixed_float16":
            warn(
                "--precision=mixed_float16 without a GPU: the CPU emulates float16 and trains about "
                "200x slower than float32. Use --precision=mixed_bfloat16 on CPU (faster than float32 "
                "on CPUs with AVX-512), or float32."
            )
        cpu = cpu_flags() if cpu is None else cpu
        if precision == "mixed_bfloat16" and cpu is not None and not cpu & {"avx512f", "avx512_bf16", "amx_bf16"}:
            warn(
                "--precision=mixed_bfloat16 on a CPU without AVX-512: bfloat16 is emulated here and "
                "trains slower than float32 (it is faster on CPUs with AVX-512 and on GPUs)."
            )
        return
    need = _MIN_CAPABILITY[precision]
    for i, details in enumerate(gpu_details):
        capability = details.get("compute_capability")
        if capability is not None and tuple(capability) < need:
            name = details.get("device_name", f"GPU {i}")
            hint = ("use --precision=mixed_float16 (Volta and newer) or float32" if precision == "mixed_bfloat16"
                    else "use --precision=float32")
            raise SegtrainError(
                f"--precision={precision} needs NVIDIA compute capability {need[0]}.{need[1]} or newer; "
                f"GPU {i} ({name}) has {capability[0]}.{capability[1]}: {hint}."
            )


def set_precision(precision: str) -> None:
    """Checks ``precision`` and makes it Keras's global dtype policy (before building a model)."""
    check_precision(precision)
    keras.mixed_precision.set_global_policy(precision)
