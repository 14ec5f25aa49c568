"""The memory bank's faiss index: maximum-inner-product search over unit vectors (DESIGN.md §6).

The index type is a faiss index-factory string from params (``Flat`` by default; ``IVF…``,
``HNSW…`` and ``…PQ…`` variants for large banks), always with the inner-product metric, so on
L2-normalized embeddings scores are cosine similarities. Indexes that need training (IVF, PQ)
are trained on the bank itself (or a seeded sample of it). Search breadth (``nprobe`` for IVF,
``efSearch`` for HNSW) is applied through faiss's ``ParameterSpace``.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

INDEX_FILE = "index.faiss"
TRAIN_SAMPLE = 200_000


class MemoryBankError(ValueError):
    """Empty bank, dimension mismatch or an unusable factory string."""


def build_index(
    embeddings: np.ndarray, factory: str, *, seed: int = 0, nprobe: int = 16, ef_search: int = 64
) -> faiss.Index:
    """Build an inner-product index over ``(N, D)`` float32 unit vectors."""
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise MemoryBankError(
            f"the memory bank is empty (embeddings of shape {embeddings.shape}); "
            "there must be at least one train document to retrieve from"
        )
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise MemoryBankError(
            f"index.factory {factory!r} is not a faiss factory string: {err}"
        ) from None
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors
        if len(vectors) > TRAIN_SAMPLE:
            sample = vectors[rng.choice(len(vectors), TRAIN_SAMPLE, replace=False)]
        try:
            index.train(sample)
        except RuntimeError as err:
            raise MemoryBankError(
                f"cannot train {factory!r} on {len(sample)} vectors: {err}"
            ) from None
    index.add(vectors)
    set_search_params(index, nprobe=nprobe, ef_search=ef_search)
    return index


def set_search_params(index: faiss.Index, *, nprobe: int, ef_search: int) -> None:
    """Apply ``nprobe`` to IVF indexes and ``efSearch`` to HNSW ones; others ignore both."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
    graph = faiss.downcast_index(index)
    if hasattr(graph, "hnsw"):
        graph.hnsw.efSearch = ef_search


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, row ids) per query; row id -1 means fewer than ``k`` results."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise MemoryBankError(
            f"query dimension {queries.shape[-1] if queries.ndim else '?'} does not match the "
            f"index dimension {index.d}: the queries come from another encoder than the index"
        )
    return index.search(queries, min(k, index.ntotal))


def save_index(index: faiss.Index, path: str | Path) -> None:
    faiss.write_index(index, str(path))


def load_index(path: str | Path, *, nprobe: int = 16, ef_search: int = 64) -> faiss.Index:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run the index stage first")
    index = faiss.read_index(str(path))
    set_search_params(index, nprobe=nprobe, ef_search=ef_search)
    return index
