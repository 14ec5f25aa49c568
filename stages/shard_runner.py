"""Which shard runner runs a data stage's work: in this process, or through flows/shards.py.

The ``tokenize`` and ``index`` stages cut their per-row work into shards (:mod:`cm3leon.shards`).
Where the shards run is a launch setting, the ``CM3LEON_SHARD_*`` variables (DESIGN.md §11,
documented in ``flows/shards.py``), that cannot change the bytes the stage writes; so the
orchestration code must not be a code dependency of the stages' outputs. Hence this module runs
the work serially, in process, unless the environment asks for another runner, and only then
imports ``flows.shards``, which validates every variable and runs the shards as Prefect tasks.
That import is an ``importlib`` call, outside the import closure that ``dvc.yaml``'s code deps
mirror (:mod:`cm3leon.source_closure`): editing ``flows/shards.py`` reruns no stage.

Stage scripts run as ``python stages/<name>.py`` (``stages/`` first on ``sys.path``) and import
this module by its bare name.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from cm3leon.shards import SERIAL, ShardExecutor

# The two variables that ask for shards to run elsewhere than in this process. flows/shards.py
# owns them (ENV_RUNNER, ENV_ADDRESS) and every other one, but reading these two here is what
# decides whether that module is imported at all; tests/stages/test_shard_runner.py checks that
# the names agree.
RUNNER_VARIABLE = "CM3LEON_SHARD_RUNNER"
ADDRESS_VARIABLE = "CM3LEON_SHARD_ADDRESS"

T = TypeVar("T")


def asks_for_a_shard_runner(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` asks for shards to run anywhere but serially in this process.

    Any runner name but ``serial`` counts, known or not (``flows/shards.py`` rejects an unknown
    one, listing the runners), and so does a cluster address without a runner
    (``flows/shards.py`` rejects it too, rather than the stage silently running serially).
    """
    runner = environ.get(RUNNER_VARIABLE, "").strip()
    return runner not in ("", SERIAL.name) or bool(environ.get(ADDRESS_VARIABLE, "").strip())


def run_on_shard_runner(stage: str, doing: str, work: Callable[[ShardExecutor], T]) -> T:
    """``work(executor)`` on the shard runner the ``CM3LEON_SHARD_*`` variables ask for.

    Serial (the default) is ``work(SERIAL)`` in this process, exactly what
    ``flows.shards.run_sharded`` does for the serial runner; the worker and batch variables mean
    nothing there and are not read. Any other runner goes to ``flows.shards.run_sharded``, as
    one Prefect flow run named after ``stage``. Prints ``<stage>: <doing> on the <runner> shard
    runner`` first.
    """
    if not asks_for_a_shard_runner(os.environ):
        print(f"{stage}: {doing} on the {SERIAL.name} shard runner")
        return work(SERIAL)
    root = str(Path(__file__).resolve().parents[1])  # the project root, for flows/
    if root not in sys.path:
        sys.path.insert(0, root)
    # importlib, not an import statement: flows/shards.py chooses where the shards run, never
    # what they compute, so it stays out of the stage's import closure (cm3leon.source_closure),
    # which is what dvc.yaml must list as the stage's code deps.
    shards = importlib.import_module("flows.shards")
    settings = shards.ShardSettings.from_env()  # a bad value raises ShardSettingsError
    print(f"{stage}: {doing} on the {settings.runner} shard runner")
    return shards.run_sharded(stage, work, settings)
