"""The numeric environment a model was trained in, recorded in its ``config.json``.

The same params and seed give the same weights only where the kernels that computed them are
the same: the CPU (vendor, model, the ISA ATen dispatches to), the torch build and its BLAS
(MKL takes vendor-dependent code paths), the thread count (reduction order), the device and
precision, and the numeric mode that pinned the kernels (:mod:`cm3leon.numerics`; under its
reproducible pins the CPU model is not recorded, since it no longer shapes the numbers). When two
runs' hashes differ, this record says whether the environment did too; ``cm3leon lineage``
prints it for each trained model, and every model folder keeps it (the transformers, the VQ
tokenizer, the retriever).
"""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Any

import torch

from cm3leon import numerics

PINNED_CPU = "any x86-64 with AVX2 (reproducible numerics)"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _blas() -> str | None:
    """The BLAS torch was built with, as ``torch.__config__.show()`` names it."""
    shown = torch.__config__.show()
    found = re.search(r"Math Kernel Library Version ([\d.]+)", shown)
    if found:
        return f"MKL {found.group(1)}"
    found = re.search(r"BLAS_INFO=(\w+)", shown)
    return found.group(1) if found else None


def numeric_environment(
    device: torch.device | str = "cpu", world: int = 1, bf16: bool = False
) -> dict[str, Any]:
    """What shaped the numbers of a training run on ``device`` with ``world`` processes."""
    device = torch.device(device)
    mode = numerics.record()
    environment: dict[str, Any] = {
        "machine": platform.machine(),
        # Under the reproducible pins the CPU model did not shape the numbers, and naming it
        # would make the same weights hash differently on two machines.
        "cpu": PINNED_CPU if mode["mode"] == "reproducible" else cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "blas": _blas(),
        "threads": torch.get_num_threads(),
        "processes": world,
        "device": device.type,
        "precision": "bf16" if bf16 else "fp32",
        "numerics": mode,
    }
    if device.type == "cuda":
        environment["gpu"] = torch.cuda.get_device_name(device)
        environment["cuda"] = torch.version.cuda
    return environment
