"""CM3Leon's retrieval policy (Yu et al. 2023 §2.2, following RA-CM3, Yasunaga et al. 2023).

Given faiss candidates for a query, choose its ``k`` neighbors:

1. never the query document itself;
2. *relevance*: skip candidates scoring above ``relevance_threshold`` (0.9) — near-duplicates of
   a training document teach the model to copy rather than to use context. This is a rule for
   building training contexts: a generation prompt has no answer in the bank to copy, and there
   the rule would drop exactly the documents that match the prompt (on ShapeWorld it dropped
   every exact-scene document from one-object prompts' contexts: 0% of them showed the prompted
   scene, 50% without the rule), so retrieval at generation time passes
   ``skip_near_duplicates=False`` (:mod:`cm3leon.retrieval.search`);
3. *modality*: with ``prefer_multimodal``, documents holding both an image and text come before
   single-modality ones (score order within each group);
4. *diversity*: skip a candidate more similar than ``duplicate_threshold`` to a neighbor already
   chosen, so the neighbors are not copies of each other;
5. stop at ``k``.

*Query dropout* (RA-CM3): before a training document is encoded as a query, a share of its
tokens is dropped — caption tokens for the text side, image patches (blacked out) for the
image side — which regularizes training by adding noise to what gets retrieved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cm3leon.config import RetrievalPolicyConfig

PATCH = 4  # image query dropout works on PATCH x PATCH pixel squares


@dataclass(frozen=True)
class Neighbor:
    row: int  # row in the memory bank
    score: float


def select_neighbors(
    candidate_rows: Sequence[int],
    candidate_scores: Sequence[float],
    bank: np.ndarray,
    multimodal: np.ndarray,
    config: RetrievalPolicyConfig,
    self_row: int | None = None,
    skip_near_duplicates: bool = True,
) -> list[Neighbor]:
    """Apply the policy to one query's candidates (rows into ``bank``, best first);
    ``skip_near_duplicates=False`` leaves out rule 2 (generation-time retrieval)."""
    threshold = config.relevance_threshold if skip_near_duplicates else np.inf
    kept = [
        Neighbor(int(r), float(s))
        for r, s in zip(candidate_rows, candidate_scores, strict=True)
        if r >= 0 and r != self_row and s <= threshold
    ]
    if config.prefer_multimodal:
        kept.sort(key=lambda n: not multimodal[n.row])  # stable: score order kept within groups
    chosen: list[Neighbor] = []
    for candidate in kept:
        if len(chosen) == config.k:
            break
        if any(
            float(bank[candidate.row] @ bank[n.row]) > config.duplicate_threshold for n in chosen
        ):
            continue
        chosen.append(candidate)
    return chosen


def drop_text_tokens(ids: Sequence[int], rate: float, rng: np.random.Generator) -> list[int]:
    """Drop each token with probability ``rate``, keeping at least one."""
    if not ids or rate == 0:
        return list(ids)
    keep = rng.random(len(ids)) >= rate
    if not keep.any():
        keep[rng.integers(len(ids))] = True
    return [t for t, k in zip(ids, keep, strict=True) if k]


def drop_image_patches(images: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Black out each ``PATCH``-pixel square of ``(N, H, W, 3)`` images with prob. ``rate``."""
    if rate == 0:
        return images
    n, h, w, _ = images.shape
    drop = rng.random((n, -(-h // PATCH), -(-w // PATCH))) < rate  # (N, h/PATCH, w/PATCH)
    mask = drop.repeat(PATCH, axis=1).repeat(PATCH, axis=2)[:, :h, :w]
    out = images.copy()
    out[mask] = 0
    return out
