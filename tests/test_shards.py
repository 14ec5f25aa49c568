"""Shards of whole batches: any map, in any execution order, equals the one-call serial path."""

import numpy as np
import pytest

from cm3leon.shards import SERIAL, ShardExecutor, map_rows, shard_bounds


def centered_batches(rows, batch_size: int = 3) -> np.ndarray:
    """A per-batch function whose output depends on which rows share a batch."""
    values = np.asarray(rows, dtype=np.float64)
    parts = [b - b.mean() for b in np.split(values, range(batch_size, len(values), batch_size))]
    return np.concatenate(parts) if len(values) else values


class OutOfOrderMap:
    """Runs shards last-first (as a cluster may finish them) and returns them in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, name, fn, payloads):
        self.calls.append((name, len(payloads)))
        done = {i: fn(payloads[i]) for i in reversed(range(len(payloads)))}
        return [done[i] for i in range(len(payloads))]


def test_shard_bounds_start_on_batch_boundaries():
    assert shard_bounds(10, 3, 2) == [(0, 6), (6, 10)]
    assert shard_bounds(6, 3, 2) == [(0, 6)]
    assert shard_bounds(7, 1, 3) == [(0, 3), (3, 6), (6, 7)]
    assert shard_bounds(0, 3, 2) == []
    with pytest.raises(ValueError, match="batch_size"):
        shard_bounds(5, 0, 1)
    with pytest.raises(ValueError, match="batches_per_shard"):
        ShardExecutor(batches_per_shard=0)


@pytest.mark.parametrize("rows", [np.arange(17) ** 2, [float(i * i) for i in range(17)]])
def test_sharded_map_equals_the_serial_call(rows):
    serial = map_rows("center", centered_batches, rows, 3, SERIAL)
    assert np.array_equal(serial, centered_batches(rows))
    for batches_per_shard in (1, 2, 5):
        out_of_order = OutOfOrderMap()
        executor = ShardExecutor("test", out_of_order, batches_per_shard)
        sharded = map_rows("center", centered_batches, rows, 3, executor)
        assert sharded.tobytes() == serial.tobytes()
        assert out_of_order.calls == [("center", len(shard_bounds(17, 3, batches_per_shard)))]
    # shards that ignored batch boundaries would have changed the result: the check has teeth
    misaligned = np.concatenate([centered_batches(rows[:4]), centered_batches(rows[4:])])
    assert not np.array_equal(misaligned, serial)


def test_a_map_that_loses_rows_is_an_error():
    def lossy(name, fn, payloads):
        return [fn(p)[:-1] for p in payloads]

    with pytest.raises(RuntimeError, match=r"center: shard of rows 0:3 returned 2 results"):
        map_rows("center", centered_batches, np.arange(9.0), 3, ShardExecutor("lossy", lossy, 1))
