"""The retrieval policy rule by rule on hand-built vectors, and query dropout rates."""

import numpy as np
import pytest

from cm3leon.config import RetrievalPolicyConfig
from cm3leon.retrieval.policy import drop_image_patches, drop_text_tokens, select_neighbors


def unit(*v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


# Bank rows: 0 is the query itself, 1 a near-duplicate of it, 2 and 3 are copies of each other,
# 4 and 5 are distinct moderately related documents, 6 is text-only.
BANK = np.stack(
    [
        unit(1, 0, 0, 0),
        unit(1, 0.1, 0, 0),  # cos with the query = 0.995
        unit(0.8, 0.6, 0, 0),
        unit(0.8, 0.6, 0.01, 0),  # cos(2, 3) ~ 1
        unit(0.7, 0, 0.714, 0),
        unit(0.6, 0, 0, 0.8),
        unit(0.85, 0, 0, 0.527),
    ]
)
QUERY = BANK[0]
MULTIMODAL = np.array([True, True, True, True, True, True, False])


def candidates():
    scores = BANK @ QUERY
    order = np.argsort(-scores)
    return order, scores[order]


def pick(self_row=0, **overrides):
    config = RetrievalPolicyConfig(**{"k": 3, "candidates": 7, **overrides})
    rows, scores = candidates()
    return [
        n.row for n in select_neighbors(rows, scores, BANK, MULTIMODAL, config, self_row=self_row)
    ]


def test_self_is_excluded():
    assert 0 not in pick(relevance_threshold=1.0)
    assert 0 in pick(self_row=None, relevance_threshold=1.0)


def test_near_duplicates_of_the_query_are_skipped():
    assert 1 not in pick()
    assert 1 in pick(relevance_threshold=1.0)


def test_generation_time_retrieval_keeps_near_duplicates_of_the_query():
    config = RetrievalPolicyConfig(k=3, candidates=7)
    rows, scores = candidates()
    kept = select_neighbors(rows, scores, BANK, MULTIMODAL, config, skip_near_duplicates=False)
    assert kept[0].row == 0 and kept[0].score > config.relevance_threshold  # the best match
    assert select_neighbors(rows, scores, BANK, MULTIMODAL, config)[0].row == 2  # training: skipped


def test_neighbors_are_not_duplicates_of_each_other():
    chosen = pick(k=4)
    assert not {2, 3} <= set(chosen)
    assert {2, 3} <= set(pick(k=4, duplicate_threshold=1.0))


def test_multimodal_documents_come_first():
    # row 6 (text only) scores 0.85, above rows 4 and 5, but is ranked after them
    assert pick(k=3) == [2, 4, 5]
    assert pick(k=3, prefer_multimodal=False) == [6, 2, 4]


def test_k_is_respected():
    for k in (0, 1, 2, 3):
        assert len(pick(k=k)) == k


def test_missing_candidates_are_ignored():
    config = RetrievalPolicyConfig(k=2, candidates=4)
    chosen = select_neighbors([4, -1, -1], [0.7, 0.0, 0.0], BANK, MULTIMODAL, config)
    assert [n.row for n in chosen] == [4]


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5])
def test_text_dropout_rate(rate):
    rng = np.random.default_rng(0)
    ids = list(range(100))
    kept = [len(drop_text_tokens(ids, rate, rng)) for _ in range(200)]
    assert np.mean(kept) == pytest.approx(100 * (1 - rate), abs=2)
    out = drop_text_tokens(ids, rate, rng)
    assert out == sorted(out) and set(out) <= set(ids)  # order kept, nothing invented
    assert drop_text_tokens([7], 0.99, rng) == [7]  # never empty


def test_image_dropout_rate_blacks_out_whole_patches():
    rng = np.random.default_rng(0)
    images = np.full((50, 32, 32, 3), 200, dtype=np.uint8)
    out = drop_image_patches(images, 0.2, rng)
    dropped = out[..., 0] == 0
    assert dropped.mean() == pytest.approx(0.2, abs=0.02)
    patches = dropped.reshape(50, 8, 4, 8, 4).transpose(0, 1, 3, 2, 4).reshape(50, 64, 16)
    assert np.all(patches.all(axis=2) | ~patches.any(axis=2))  # a patch is all or nothing
    assert images.min() == 200  # input untouched
