"""Model FLOPs utilization (MFU): the model FLOP/s a loop achieves over the machine's peak.

The peak is measured, not looked up: the best sustained FLOP/s of square matrix multiplies in
the training dtype on the training device (:func:`matmul_peak_flops`), the denominator of every
MFU figure in the project (the training loop's ``train/mfu`` and ``benchmarks/``). The model's
FLOPs per token come from :meth:`cm3leon.model.transformer.DecoderLM.flops_per_token`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], min_seconds: float = 1.0, min_repeats: int = 3) -> float:
    """Seconds per call of ``fn``: best of repeated timing windows after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(min_repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / min_repeats:
                break
        best = min(best, elapsed / calls)
    return best


def matmul_peak_flops(
    device: str = "cpu", dtype: torch.dtype = torch.float32, min_seconds: float = 1.0
) -> dict:
    """Best sustained FLOP/s of square matmuls: ``{"peak_flops", "at_size", "by_size"}``."""
    results = {}
    for n in (512, 1024, 2048) if device == "cpu" else (4096, 8192):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)

        def run(a=a, b=b):
            torch.mm(a, b)
            if device != "cpu":
                torch.cuda.synchronize()

        results[n] = 2 * n**3 / timed(run, min_seconds)
    best = max(results, key=results.get)
    return {"peak_flops": results[best], "at_size": best, "by_size": results}
