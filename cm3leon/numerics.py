"""The numeric mode of a process (``base.numerics``): which CPU kernels compute its numbers.

The same params and seed give the same bytes only where the same kernels ran. On x86-64 each
numeric library chooses its kernels by the CPU it finds, when it loads or at its first call:

- **MKL** (torch's matrix multiplies): a code path per ISA and vendor. ``MKL_CBWR`` (conditional
  numerical reproducibility) pins one path on every CPU that has it; ``AVX2`` is the newest
  path every Intel and AMD CPU of the last decade runs.
- **ATen** (torch's elementwise kernels, softmax, norms, reductions): vectorized for the CPU's
  widest ISA; ``ATEN_CPU_CAPABILITY`` caps it.
- **oneDNN** (torch's convolutions): JIT kernels per ISA; ``DNNL_MAX_CPU_ISA`` /
  ``ONEDNN_MAX_CPU_ISA`` cap it.
- **faiss** loads its AVX2, AVX-512 or generic build (``FAISS_OPT_LEVEL``); **OpenBLAS** under
  numpy and scipy picks a kernel per core type (``OPENBLAS_CORETYPE``).

and every parallel reduction splits its work by the thread count, so that is pinned too
(``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``).

``reproducible`` (the default) pins all of these to AVX2 (Haswell) and ``base.numerics.threads``
threads, so an AVX-512 Xeon and an AVX2 EPYC compute the same bytes. ``fast`` leaves every
library its own choice (the widest ISA, every core): faster on AVX-512 or many-core machines,
but the hashes in ``dvc.lock`` then depend on the CPU. On a 2-core AVX2 machine both modes run
the same kernels (``benchmarks/numerics.py`` measures the cost and the hashes under each).

The variables act only when set before the libraries load, so a stage process that finds them
unset re-executes itself with them set (``stages/stage_runtime.py``): whatever the stage script
imported first, the pins hold. Processes a stage starts (DeepSpeed ranks, Dask or Ray workers)
inherit them. A variable the user set to another value is overridden, with a line on stderr
saying so. Where the pins cannot hold (not x86-64, no AVX2/FMA) the process runs the fast
kernels and says why; :func:`record` is what a trained model's ``config.json`` keeps.

GPU kernels are outside this mode: bit-identity across GPUs is not promised (README,
"Reproducibility").

This module imports neither torch nor numpy: it runs before them.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("reproducible", "fast")
DEFAULT_MODE = "reproducible"
DEFAULT_THREADS = 2  # the CI machine's cores; part of the result in reproducible mode

# The pinned kernel paths: what every supported CPU (x86-64 with AVX2 and FMA) can run.
PINNED_KERNELS = {
    "MKL_CBWR": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FAISS_OPT_LEVEL": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
# What another CPU would make the libraries run in the fast mode, set as variables: ATen's
# generic kernels, oneDNN capped at SSE4.1, MKL's vendor-neutral path. On one machine they stand
# in for a CPU whose widest ISA differs (AVX-512 vs AVX2 is the same kind of switch); the
# benchmark and the tests train under them to show what each mode's bytes depend on.
OTHER_CPU_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "DNNL_MAX_CPU_ISA": "SSE41",
    "MKL_CBWR": "COMPATIBLE",
}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Every variable that shapes the kernels (recorded whether this module or the user set it).
KERNEL_VARIABLES = (*PINNED_KERNELS, *THREAD_VARIABLES)
REQUIRED_CPU_FLAGS = ("avx2", "fma")


@dataclass(frozen=True)
class NumericsState:
    """What :func:`pin` did: the mode asked for, the mode in effect, why they differ
    (``reason``), the variables it overrode (name, the user's value) and whether it changed the
    environment at all (then the process must restart for the libraries to see it)."""

    requested: str
    mode: str
    threads: int | None
    reason: str | None = None
    overridden: tuple[tuple[str, str], ...] = ()
    changed: bool = False


_state: NumericsState | None = None


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), or None where they cannot be read."""
    path = Path(cpuinfo)
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def unsupported_reason(machine: str, flags: set[str] | None) -> str | None:
    """Why the reproducible pins cannot hold on this CPU, or None when they can."""
    if machine.lower() not in ("x86_64", "amd64"):
        return f"the CPU is {machine}, not x86-64 (the pinned AVX2 paths do not exist there)"
    if flags is None:
        return "the CPU's feature flags cannot be read (/proc/cpuinfo), so AVX2 is not known"
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    return None


def pinned_environment(threads: int) -> dict[str, str]:
    """The variables the reproducible mode sets, with ``threads`` threads."""
    return {**PINNED_KERNELS, **dict.fromkeys(THREAD_VARIABLES, str(threads))}


def pin(
    mode: str,
    threads: int,
    environ: MutableMapping[str, str] | None = None,
    *,
    unsupported: str | None = None,
) -> NumericsState:
    """Set the kernel variables of ``mode`` in ``environ`` (default ``os.environ``) and return
    what was done, saying on stderr what it overrode or why it could not pin. ``unsupported``
    (default: :func:`unsupported_reason` of this CPU) is a reason the pins cannot hold."""
    global _state
    if mode not in MODES:
        raise ValueError(f"base.numerics.mode: must be one of {', '.join(MODES)}, got {mode!r}")
    environ = os.environ if environ is None else environ
    if mode == "fast":
        state = NumericsState(mode, "fast", None)
    else:
        if unsupported is None:
            unsupported = unsupported_reason(platform.machine(), cpu_flags())
        if unsupported is not None:
            state = NumericsState(mode, "fast", None, reason=unsupported)
            print(
                f"numerics: base.numerics.mode is reproducible but {unsupported}: this process "
                "runs the fast kernels, so its hashes may differ from another machine's",
                file=sys.stderr,
            )
        else:
            wanted = pinned_environment(threads)
            changed = {k: v for k, v in wanted.items() if environ.get(k) != v}
            overridden = tuple((k, environ[k]) for k in changed if k in environ)
            for name, value in overridden:
                print(
                    f"numerics: reproducible mode sets {name}={wanted[name]} (was {value}); "
                    "base.numerics.mode: fast keeps your value",
                    file=sys.stderr,
                )
            environ.update(changed)
            state = NumericsState(mode, mode, threads, None, overridden, bool(changed))
    _state = state
    return state


def pin_process(mode: str, threads: int) -> NumericsState:
    """:func:`pin` for this process, and when that changed its environment, re-execute it with
    the same command line so that every library loads under the pins (numpy, faiss or torch
    may already be imported). Returns only when nothing needed to change."""
    pinned = pin(mode, threads)
    if pinned.changed:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    return pinned


def read_numerics(params_path: str | Path) -> tuple[str, int] | None:
    """``(mode, threads)`` of ``base.numerics`` in a params file, read without the typed
    loader (which imports numpy, one of the libraries to pin). None when the file is missing,
    malformed or the values are off: the stage's own :func:`~cm3leon.config.load_params` then
    reports the error with its key."""
    import yaml

    try:
        raw = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    base = raw.get("base", {}) if isinstance(raw, Mapping) else None
    numerics = base.get("numerics", {}) if isinstance(base, Mapping) else None
    if not isinstance(numerics, Mapping):
        return None
    mode = numerics.get("mode", DEFAULT_MODE)
    threads = numerics.get("threads", DEFAULT_THREADS)
    if mode not in MODES or not isinstance(threads, int) or isinstance(threads, bool):
        return None
    return mode, max(threads, 1)


def params_path(argv: list[str], default: str = "params.yaml") -> str:
    """The value of ``--params`` in a stage's ``argv`` (``default`` when absent)."""
    for i, arg in enumerate(argv):
        if arg == "--params" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--params="):
            return arg.split("=", 1)[1]
    return default


def state() -> NumericsState | None:
    """What :func:`pin` did in this process, or None when it never ran (library use)."""
    return _state


def record() -> dict[str, Any]:
    """The numeric mode of this process as a trained model's ``config.json`` keeps it: the
    mode in effect (with the one asked for and why, when they differ) and every kernel
    variable set, whoever set it."""
    current = _state
    entry: dict[str, Any] = {
        "mode": current.mode if current is not None else "not pinned (library call)",
        "variables": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ},
    }
    if current is not None and current.reason is not None:
        entry["requested"] = current.requested
        entry["reason"] = current.reason
    return entry
