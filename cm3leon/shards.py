"""Data-parallel shards: how the data stages split per-row work so any executor can run it.

Encoding every image with the VQ tokenizer (``tokenize``) and embedding every document with the
dual encoder (``index``) are independent per row, so they can be spread over processes or
machines (DESIGN.md §11: Prefect task runners backed by Dask or Ray). This module is the
library's half of that contract and knows nothing about Prefect:

- rows are cut into shards of whole batches (``batch_size * batches_per_shard`` rows), so every
  batch a shard encodes is exactly a batch the one-process path would encode;
- a :data:`ShardMap` runs ``fn`` over the shards' payloads anywhere it likes and returns the
  results **in payload order**; the results are concatenated in that order.

Hence any map — a loop, threads, a Dask or Ray cluster — returns arrays byte-identical to the
serial path, which calls ``fn`` once on all rows (the data stages' artifact hashes do not depend
on the executor; tests check this). ``fn`` must be picklable for process-based maps: a
module-level function or a ``functools.partial`` of one (a model bound as an argument pickles
with it). The orchestration side (``flows/shards.py``) builds Prefect-backed maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# (name, fn, payloads) -> [fn(p) for p in payloads], in order; ``name`` labels the work in logs.
ShardMap = Callable[[str, Callable[[Any], Any], list[Any]], list[Any]]


def serial_map(name: str, fn: Callable[[Any], Any], payloads: list[Any]) -> list[Any]:
    """The in-process map: a plain loop."""
    return [fn(payload) for payload in payloads]


@dataclass(frozen=True)
class ShardExecutor:
    """Where shards run (``map``), and how many batches make one shard.

    ``map=None`` is the serial path: ``fn`` is called once on all rows, no shards are cut.
    ``batches_per_shard`` trades scheduling overhead against load balance; it never changes
    results.
    """

    name: str = "serial"
    map: ShardMap | None = field(default=None, compare=False)
    batches_per_shard: int = 4

    def __post_init__(self) -> None:
        if self.batches_per_shard < 1:
            raise ValueError(f"batches_per_shard must be >= 1, got {self.batches_per_shard}")


SERIAL = ShardExecutor()


def shard_bounds(n_rows: int, batch_size: int, batches_per_shard: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n_rows)``; each start is a multiple of a batch."""
    if batch_size < 1 or batches_per_shard < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and batches_per_shard ({batches_per_shard}) must be >= 1"
        )
    rows = batch_size * batches_per_shard
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def map_rows(
    name: str,
    fn: Callable[[Any], np.ndarray],
    rows: Sequence[Any] | np.ndarray,
    batch_size: int,
    executor: ShardExecutor = SERIAL,
) -> np.ndarray:
    """``fn(rows)`` computed shard by shard on ``executor``; equal to ``fn(rows)`` itself.

    ``fn`` maps a slice of rows (an array or a list) to an array with one leading entry per row,
    processing it in batches of ``batch_size`` starting at the slice's first row.
    """
    bounds = shard_bounds(len(rows), batch_size, executor.batches_per_shard)
    if executor.map is None or len(bounds) <= 1:
        return fn(rows)
    parts = executor.map(name, fn, [rows[start:stop] for start, stop in bounds])
    for (start, stop), part in zip(bounds, parts, strict=True):
        if len(part) != stop - start:
            raise RuntimeError(
                f"{name}: shard of rows {start}:{stop} returned {len(part)} results "
                f"instead of {stop - start}; the shard map ({executor.name}) lost rows"
            )
    return np.concatenate(parts)


def apply_shard(fn: Callable[[Any], Any], payload: Any) -> Any:
    """``fn(payload)``: the unit of work a remote map runs (importable, hence picklable)."""
    return fn(payload)
