"""benchmarks/bench_train.py: the paired segtrain/minimal ratio and its 95% interval."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(REPO, "benchmarks", "bench_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_interval_is_students_t_over_the_log_ratios(bench):
    mean, low, high = bench.paired_interval([0.9, 1.1])
    logs = [math.log(0.9), math.log(1.1)]
    centre = sum(logs) / 2
    half = 12.706 * abs(logs[1] - logs[0]) / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1 df) x sem
    assert mean == pytest.approx(math.sqrt(0.9 * 1.1))
    assert (low, high) == (pytest.approx(math.exp(centre - half)), pytest.approx(math.exp(centre + half)))


def test_the_interval_narrows_with_rounds_of_the_same_scatter(bench):
    few = bench.paired_interval([0.95, 1.05] * 3)
    many = bench.paired_interval([0.95, 1.05] * 30)
    assert few[1] < many[1] < many[0] < many[2] < few[2]
    assert bench.paired_interval([1.02] * 4) == pytest.approx((1.02, 1.02, 1.02))
    assert bench.paired_interval([1.0]) is None


def test_a_target_is_met_below_or_unsettled_by_where_the_interval_lies(bench):
    assert bench.verdict((1.0, 0.98, 1.02), 0.97) == "met"
    assert bench.verdict((0.95, 0.94, 0.965), 0.97) == "below"
    assert bench.verdict((0.99, 0.95, 1.03), 0.97) == "unsettled"
    assert bench.verdict(None, 0.97) == "unsettled"
    # 40 rounds scattering by +-5% around 1.0 settle a 3-point margin; 4 rounds do not
    assert bench.verdict(bench.paired_interval([0.95, 1.05] * 20), 0.97) == "met"
    assert bench.verdict(bench.paired_interval([0.95, 1.05] * 2), 0.97) == "unsettled"
