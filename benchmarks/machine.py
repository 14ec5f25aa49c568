"""Shared benchmark helpers: describe the machine and measure its fp32 matmul peak.

Every benchmark reports ratios measured in the same run (achieved FLOP/s over this measured
peak, one implementation over another), never absolute wall-clock targets.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def timed(fn, min_seconds: float = 1.0, min_repeats: int = 3) -> float:
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


def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Best sustained FLOP/s of square matmuls (the denominator of every MFU figure here)."""
    results = {}
    for n in (512, 1024, 2048) if device == "cpu" else (4096, 8192):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)

        def run(a=a, b=b):
            torch.mm(a, b)
            if device != "cpu":
                torch.cuda.synchronize()

        results[n] = 2 * n**3 / timed(run)
    best = max(results, key=results.get)
    return {"peak_flops": results[best], "at_size": best, "by_size": results}


def save_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path
