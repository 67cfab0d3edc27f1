"""Precision: the policy and the hardware checks (training in each precision: tests/train/test_precision.py)."""

from __future__ import annotations

import warnings

import pytest

from segtrain import precision as P
from segtrain.errors import SegtrainError, SegtrainWarning


def test_unknown_precision():
    with pytest.raises(SegtrainError, match="--precision='float8' is not one of float32, mixed_float16"):
        P.check_precision("float8", gpu_details=[])


def test_float16_without_gpu_warns_and_suggests_bfloat16():
    with pytest.warns(SegtrainWarning, match="about 200x slower than float32. Use --precision=mixed_bfloat16"):
        P.check_precision("mixed_float16", gpu_details=[])


@pytest.mark.parametrize("precision, capability, message", [
    ("mixed_bfloat16", (7, 0), "--precision=mixed_bfloat16 needs NVIDIA compute capability 8.0 or newer; "
                               "GPU 0 (Tesla V100) has 7.0: use --precision=mixed_float16"),
    ("mixed_float16", (6, 1), "--precision=mixed_float16 needs NVIDIA compute capability 7.0 or newer; "
                              "GPU 0 (Tesla V100) has 6.1: use --precision=float32."),
])
def test_precision_the_gpu_cannot_do(precision, capability, message):
    gpu = {"device_name": "Tesla V100", "compute_capability": capability}
    with pytest.raises(SegtrainError) as e:
        P.check_precision(precision, gpu_details=[gpu])
    assert message in str(e.value)


def test_bfloat16_on_a_cpu_without_avx512_warns():
    with pytest.warns(SegtrainWarning, match="bfloat16 is emulated here and trains slower than float32"):
        P.check_precision("mixed_bfloat16", gpu_details=[], cpu={"avx2", "fma"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.check_precision("mixed_bfloat16", gpu_details=[], cpu={"avx2", "avx512f"})


def test_precision_the_gpu_can_do():
    P.check_precision("mixed_bfloat16", gpu_details=[{"device_name": "A100", "compute_capability": (8, 0)}])
