"""Shared benchmark helpers: describe the machine and measure its fp32 matmul peak.

Every benchmark reports ratios measured in the same run (achieved FLOP/s over this measured
peak, one implementation over another), never absolute wall-clock targets.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from cm3leon.training.throughput import matmul_peak_flops, timed

__all__ = ["append_line", "describe_machine", "matmul_peak_flops", "save_result", "timed"]

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


def save_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def append_line(table: str | Path, line: dict) -> None:
    """Append ``line`` as one JSON line to ``table`` (a results ``.jsonl``), floats that are not
    plain JSON (numpy scalars) rounded to 4 places."""
    Path(table).parent.mkdir(parents=True, exist_ok=True)
    with Path(table).open("a") as f:
        f.write(json.dumps(line, default=lambda v: round(float(v), 4)) + "\n")
