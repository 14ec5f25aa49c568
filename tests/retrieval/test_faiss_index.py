"""faiss memory bank: factory strings, save/load, dimension and emptiness errors."""

import numpy as np
import pytest

from cm3leon.retrieval.faiss_index import (
    MemoryBankError,
    build_index,
    load_index,
    save_index,
    search,
)


def vectors(n, d=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW16", "IVF4,PQ4x4"])
def test_index_types_find_exact_matches(factory):
    bank = vectors(600)
    index = build_index(bank, factory, nprobe=8, ef_search=64)
    scores, rows = search(index, bank[:20], 5)
    assert rows.shape == (20, 5)
    if "PQ" not in factory:  # PQ is lossy; the others find each vector itself first
        assert rows[:, 0].tolist() == list(range(20))
        assert np.allclose(scores[:, 0], 1.0, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    bank = vectors(300)
    index = build_index(bank, "IVF4,Flat", nprobe=4)
    save_index(index, tmp_path / "index.faiss")
    loaded = load_index(tmp_path / "index.faiss", nprobe=4)
    assert np.array_equal(search(index, bank[:10], 3)[1], search(loaded, bank[:10], 3)[1])
    with pytest.raises(FileNotFoundError, match="run the index stage"):
        load_index(tmp_path / "missing.faiss")


def test_errors_are_clear():
    with pytest.raises(MemoryBankError, match="memory bank is empty"):
        build_index(np.zeros((0, 16), np.float32), "Flat")
    with pytest.raises(MemoryBankError, match="not a faiss factory string"):
        build_index(vectors(10), "NotAnIndex")
    index = build_index(vectors(10), "Flat")
    with pytest.raises(MemoryBankError, match="does not match the index dimension 16"):
        search(index, vectors(2, d=8), 1)
