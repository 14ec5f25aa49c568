"""The measured matmul peak that every MFU figure divides by."""

from __future__ import annotations

import time

import torch

from cm3leon.training.throughput import matmul_peak_flops, timed


def test_timed_reports_seconds_per_call():
    assert 0.004 <= timed(lambda: time.sleep(0.005), min_seconds=0.06) < 0.05


def test_matmul_peak_is_the_best_size_and_bounds_a_real_matmul():
    peak = matmul_peak_flops(min_seconds=0.3)
    assert set(peak["by_size"]) == {512, 1024, 2048}
    assert peak["peak_flops"] == max(peak["by_size"].values()) == peak["by_size"][peak["at_size"]]
    n = 256  # a matmul of another size achieves at most about the peak
    a, b = torch.randn(n, n), torch.randn(n, n)
    achieved = 2 * n**3 / timed(lambda: torch.mm(a, b), min_seconds=0.3)
    assert peak["peak_flops"] > 1e8 and achieved < 1.5 * peak["peak_flops"]
