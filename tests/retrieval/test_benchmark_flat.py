"""The retrieval benchmark's exact-search anchors (benchmarks/retrieval.py): the BLAS-path faiss
search and the chunked torch matmul top-k return what faiss's default ``IndexFlatIP`` returns,
and the BLAS settings are restored after each call."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import faiss
import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _benchmark():
    """benchmarks/retrieval.py under its own module name (``retrieval`` is also a test folder)."""
    sys.path.insert(0, str(BENCHMARKS))  # for its ``from machine import ...``
    spec = importlib.util.spec_from_file_location(
        "benchmark_retrieval", BENCHMARKS / "retrieval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exact_anchors_agree_with_faiss_flat():
    bench = _benchmark()
    data = bench.ClusteredSphere(dim=32, clusters=20, intrinsic_dim=4, spread=0.5, noise=0.03)
    base, queries = data.sample(5000, seed=1), data.sample(64, seed=2)
    index = faiss.IndexFlatIP(32)
    index.add(base)
    scores, ids = index.search(queries, bench.K)
    threshold = faiss.cvar.distance_compute_blas_threshold
    blas_scores, blas_ids = bench.BlasFlat(index, database_bs=1024).search(queries, bench.K)
    assert faiss.cvar.distance_compute_blas_threshold == threshold  # restored
    torch_scores, torch_ids = bench.TorchFlat(base, chunk=700).search(
        queries, bench.K
    )  # chunks cut rows
    for other_scores, other_ids in ((blas_scores, blas_ids), (torch_scores, torch_ids)):
        np.testing.assert_allclose(other_scores, scores, atol=1e-5)
        assert (other_ids == ids).mean() > 0.99  # ids may swap only between near-equal scores
