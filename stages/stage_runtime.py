"""What every stage process does around its library call: dvclive, errors and final metrics.

A stage script parses its arguments and hands :func:`run_stage` one function that loads the
params and calls the library; this module does the rest, the same way for every stage:

- the dvclive run (`--live`): opened on rank 0 only (the one process of a single-process stage,
  the first of a torchrun/DeepSpeed launch), with no DVC experiment, `dvc.yaml` or report of its
  own; :meth:`StageRun.log` is the library's ``on_log`` callback and :attr:`StageRun.final`
  keeps each metric's last logged value;
- the errors a user can fix (bad params or data, a missing input): printed as
  ``<stage>: error: <message>`` on stderr, exit code 1, no traceback;
- the numeric mode (``base.numerics`` of ``--params``): pinned when this module is imported,
  the process re-executed once if that changed its environment (:func:`pin_numerics`);
- the final metrics (`--metrics`): the dict the work returns plus the stage's wall time
  (``stage_seconds``), written atomically on rank 0 and echoed as ``<stage>: {json}``.

The data stages' shard runner is :mod:`shard_runner`'s concern, not this module's. Stage scripts
run as ``python stages/<name>.py``, which puts ``stages/`` first on ``sys.path``: they import
this module by its bare name.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cm3leon import numerics
from cm3leon.artifacts import atomic_write_json


def pin_numerics(argv: list[str], script: str) -> None:
    """Pin the kernels of ``base.numerics`` (:mod:`cm3leon.numerics`) for a stage process and,
    when that changed the environment, re-execute the process so every library loads under it
    (numpy, faiss and torch may already be imported: the stage script's imports ran first).
    Only a stage script run as a program does this; importing this module elsewhere (tests,
    the flow) pins nothing."""
    if Path(script).resolve().parent != Path(__file__).resolve().parent:
        return
    found = numerics.read_numerics(numerics.params_path(argv))
    if found is not None:  # else the stage's load_params names the bad key
        numerics.pin_process(*found)


pin_numerics(sys.argv[1:], sys.argv[0])

# Errors that speak to the user: every config, corpus, vocab, tokens and memory-bank error of
# the library is a ValueError; a missing upstream artifact is a FileNotFoundError.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)


class StageRun:
    """One stage process: its dvclive run (rank 0), the metrics it logged, its wall clock."""

    def __init__(self, stage: str, live_dir: str | None = None, log_prefix: str = "") -> None:
        self.stage = stage
        self.log_prefix = log_prefix
        self.rank = int(os.environ.get("RANK", "0"))
        self.final: dict[str, float] = {}
        self._start = time.perf_counter()
        self._live = None
        if live_dir is not None and self.rank == 0:
            from dvclive import Live

            self._live = Live(dir=live_dir, save_dvc_exp=False, dvcyaml=None, report=None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """The library's ``on_log``: one dvclive step of ``<prefix><key>`` values."""
        named = {f"{self.log_prefix}{key}": value for key, value in metrics.items()}
        self.final.update(named)
        if self._live is None:
            return
        self._live.step = step
        for name, value in named.items():
            self._live.log_metric(name, value)
        self._live.next_step()

    def close(self) -> None:
        """End the dvclive run (its summary and plots under the live folder). A run that logged
        no step (a stage that loaded a checkpoint instead of training) still leaves an empty
        ``plots/metrics`` folder, the output ``dvc.yaml`` declares."""
        if self._live is not None:
            self._live.end()
            Path(self._live.dir, "plots", "metrics").mkdir(parents=True, exist_ok=True)
            self._live = None

    def write_metrics(self, path: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` plus ``stage_seconds``, written atomically to ``path`` on rank 0."""
        metrics = {**metrics, "stage_seconds": round(time.perf_counter() - self._start, 1)}
        if self.rank == 0:
            atomic_write_json(path, metrics)
        return metrics


def run_stage(
    stage: str,
    work: Callable[[StageRun], dict[str, Any] | None],
    *,
    live: str | None = None,
    log_prefix: str = "",
    metrics: str | None = None,
    errors: tuple[type[Exception], ...] = USER_ERRORS,
) -> int:
    """Run ``work(run)`` as stage ``stage`` and return the process's exit code.

    ``live``: the dvclive folder (rank 0 logs there through ``run.log``, with ``log_prefix``
    before every key). ``metrics``: where the dict ``work`` returns is written, with
    ``stage_seconds``, and then printed as ``<stage>: {json}``. An exception of ``errors`` is
    printed as ``<stage>: error: <message>`` and gives exit code 1.
    """
    run = StageRun(stage, live, log_prefix)
    try:
        result = work(run)
    except errors as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        return 1
    finally:
        run.close()
    if metrics is not None and run.rank == 0:
        written = run.write_metrics(metrics, result)
        print(f"{stage}: {json.dumps(written, sort_keys=True)}")
    return 0
