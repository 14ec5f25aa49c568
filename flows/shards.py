"""Prefect task runners for the data stages' shards: encode/embed in parallel (DESIGN.md §11).

The ``tokenize`` stage's image encoding and the ``index`` stage's embeddings are cut into shards
of whole batches by the library (:mod:`cm3leon.shards`); this module runs those shards as
mapped Prefect tasks on a task runner chosen at launch time, never in ``params.yaml``: where
work runs cannot change what it computes (the artifacts are byte-identical to the serial path,
which the tests check), so it must not make DVC rerun a stage either.

Environment (read by the data stages through ``stages/shard_runner.py``, which imports this
module only when a runner other than ``serial`` is asked for; ``cm3leon run --shard-runner ...``
and the Prefect deployments set it for the stages they launch):

- ``CM3LEON_SHARD_RUNNER``: ``serial`` (default: in-process, no Prefect), ``threads``
  (Prefect's ``ThreadPoolTaskRunner``), ``dask`` (``prefect_dask.DaskTaskRunner``) or ``ray``
  (``prefect_ray.RayTaskRunner``, the ``ray`` extra);
- ``CM3LEON_SHARD_WORKERS``: workers of the local Dask cluster / Ray instance / thread pool
  (default: the CPU count);
- ``CM3LEON_SHARD_ADDRESS``: an existing Dask scheduler (``tcp://host:8786``) or Ray cluster
  (``ray://host:10001``) to use instead of a local one — workers need ``cm3leon`` installed,
  this project's root on their path (they import ``flows.shards``) and the data readable;
- ``CM3LEON_BATCHES_PER_SHARD``: batches per shard (default 4): scheduling granularity only.

A stage's work then runs as one Prefect flow run (``cm3leon-tokenize``, ``cm3leon-index``) on
that task runner — one cluster per stage — with one task run per shard, named after the work
(``encode-train``, ``embed-bank-images``, ...), on the API the stage sees (``PREFECT_API_URL``,
which ``cm3leon run`` passes on; otherwise Prefect's temporary local server).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from cm3leon.shards import SERIAL, ShardExecutor, apply_shard

# Seconds the temporary Prefect server ``shared_api_url`` starts may take to answer, at least:
# Prefect's ``server.ephemeral.startup_timeout_seconds`` is 20 by default, and on a 2-core
# machine busy with training the start took longer and the stage failed ("Timed out while
# attempting to connect to ephemeral Prefect API server"). A larger setting wins.
EPHEMERAL_STARTUP_TIMEOUT_S = 120

RUNNERS = ("serial", "threads", "dask", "ray")
ENV_RUNNER = "CM3LEON_SHARD_RUNNER"
ENV_WORKERS = "CM3LEON_SHARD_WORKERS"
ENV_ADDRESS = "CM3LEON_SHARD_ADDRESS"
ENV_BATCHES = "CM3LEON_BATCHES_PER_SHARD"
T = TypeVar("T")


class ShardSettingsError(ValueError):
    """A ``CM3LEON_SHARD_*`` variable is invalid, or its runner's package is missing."""


@dataclass(frozen=True)
class ShardSettings:
    """Which task runner runs the shards, with how many workers, on which cluster."""

    runner: str = "serial"
    workers: int = max(1, os.cpu_count() or 1)
    address: str | None = None
    batches_per_shard: int = 4

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ShardSettingsError(
                f"{ENV_RUNNER}={self.runner!r} is not one of {', '.join(RUNNERS)}"
            )
        if self.workers < 1:
            raise ShardSettingsError(f"{ENV_WORKERS}={self.workers} must be >= 1")
        if self.batches_per_shard < 1:
            raise ShardSettingsError(f"{ENV_BATCHES}={self.batches_per_shard} must be >= 1")
        if self.address and self.runner not in ("dask", "ray"):
            raise ShardSettingsError(
                f"{ENV_ADDRESS} is set but {ENV_RUNNER}={self.runner!r}; only dask and ray "
                "connect to a cluster"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ShardSettings:
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            runner=env.get(ENV_RUNNER, "").strip() or defaults.runner,
            workers=_int(env, ENV_WORKERS, defaults.workers),
            address=env.get(ENV_ADDRESS, "").strip() or None,
            batches_per_shard=_int(env, ENV_BATCHES, defaults.batches_per_shard),
        )

    def environ(self) -> dict[str, str]:
        """These settings as the variables :meth:`from_env` reads (for a child process)."""
        env = {
            ENV_RUNNER: self.runner,
            ENV_WORKERS: str(self.workers),
            ENV_BATCHES: str(self.batches_per_shard),
        }
        if self.address:
            env[ENV_ADDRESS] = self.address
        return env


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ShardSettingsError(f"{key}={raw!r} is not an integer") from None


def task_runner(settings: ShardSettings) -> Any:
    """The Prefect task runner for ``settings`` (not for ``serial``, which uses no Prefect)."""
    if settings.runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=settings.workers)
    if settings.runner == "dask":
        DaskTaskRunner = _runner_class("prefect_dask", "DaskTaskRunner", "pip install prefect-dask")
        if settings.address:
            return DaskTaskRunner(address=settings.address)
        # One single-threaded process per worker: Dask's nanny also pins OMP/MKL threads to 1.
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": settings.workers,
                "threads_per_worker": 1,
                "processes": True,
            }
        )
    if settings.runner == "ray":
        RayTaskRunner = _runner_class("prefect_ray", "RayTaskRunner", "pip install -e '.[ray]'")
        if settings.address:
            return RayTaskRunner(address=settings.address)
        return RayTaskRunner(init_kwargs={"num_cpus": settings.workers})
    raise ShardSettingsError(f"the {settings.runner!r} runner has no Prefect task runner")


def _runner_class(module: str, name: str, install: str) -> Any:
    """``module.name``, or an error saying which package the chosen runner needs."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        package = module.replace("_", "-")
        raise ShardSettingsError(
            f"{ENV_RUNNER} asks for {name}, which needs {package}: {install}"
        ) from None


def run_sharded(
    name: str, work: Callable[[ShardExecutor], T], settings: ShardSettings | None = None
) -> T:
    """``work(executor)`` with the executor ``settings`` (default: the environment) ask for.

    ``serial`` calls ``work(SERIAL)`` directly, without Prefect. Any other runner runs ``work``
    as one Prefect flow run (``cm3leon-<name>``) on that task runner, so a stage starts one
    cluster, and every shard map inside it becomes mapped task runs of that flow run.
    """
    settings = ShardSettings.from_env() if settings is None else settings
    if settings.runner == "serial":
        return work(SERIAL)
    from prefect import flow, task, unmapped
    from prefect.cache_policies import NO_CACHE

    runner = task_runner(settings)
    # Results come straight back from the runner; nothing is cached or persisted.
    shard_task = task(apply_shard, cache_policy=NO_CACHE, persist_result=False)

    def map_in_flow(label: str, fn: Callable[[Any], Any], payloads: list[Any]) -> list[Any]:
        named = shard_task.with_options(name=label.replace(" ", "-"))
        return named.map(fn=unmapped(fn), payload=payloads).result()

    executor = ShardExecutor(
        name=settings.runner, map=map_in_flow, batches_per_shard=settings.batches_per_shard
    )

    url = shared_api_url()
    sharded = flow(
        _call_work,
        name=f"cm3leon-{name}",
        flow_run_name=f"{name} on {settings.runner} "
        + (f"at {settings.address}" if settings.address else f"({settings.workers} workers)"),
        task_runner=runner,
        persist_result=False,
        validate_parameters=False,
    )
    token = _WORK.set(partial(work, executor))
    try:
        with _api_url_for_workers(url):
            return sharded()
    finally:
        _WORK.reset(token)


def shared_api_url() -> str | None:
    """The Prefect API this process reports to, for processes it starts to report to as well.

    ``PREFECT_API_URL`` when set. Otherwise Prefect runs a temporary local server on first use
    in each process: every Dask or Ray worker would start a throw-away server of its own (for
    its logs and events; measured: three servers for a two-worker cluster), and a stage that
    ``dvc repro`` launches would record its flow runs on one the flow never sees. So this starts
    this process's temporary server now (the very one Prefect's client would start) and returns
    its address. ``None`` when there is no server and temporary ones are disabled.
    """
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
    )

    url = get_current_settings().api.url
    if url or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # a per-process singleton: the client's own server
    configured = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    server.start(timeout=max(EPHEMERAL_STARTUP_TIMEOUT_S, configured))
    return server.api_url


@contextmanager
def _api_url_for_workers(url: str | None) -> Iterator[None]:
    """``PREFECT_API_URL=url`` in the environment that worker processes inherit, meanwhile."""
    if url is None or os.environ.get("PREFECT_API_URL") == url:
        yield
        return
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PREFECT_API_URL"]
        else:
            os.environ["PREFECT_API_URL"] = previous


# The flow's work is handed over out of band. Task runners ship the flow object (and its
# parameters) to every worker with each task; a closure over the stage's state (its dvclive
# logger, the corpus) would be pickled with it, or fail to pickle. ``_call_work`` pickles by
# reference instead: workers need this module importable (the project root on their path).
_WORK: ContextVar[Callable[[], Any]] = ContextVar("cm3leon_shard_work")


def _call_work() -> Any:
    """The body of a stage's shard flow: the work :func:`run_sharded` set for this call."""
    return _WORK.get()()
