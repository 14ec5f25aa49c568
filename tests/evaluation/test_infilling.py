"""Image infilling as evaluate scores it: which rows are masked, and the metrics on a toy model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cm3leon.decoding.selector import Strategy
from cm3leon.evaluation.infilling import infilling_metrics, masked_region, masked_rows
from tests.inference.test_multimodal import IMAGE, toy


@pytest.mark.parametrize(("grid", "rows"), [(8, (2, 6)), (4, (1, 3)), (3, (1, 2)), (1, (0, 1))])
def test_the_middle_half_of_the_rows_is_masked(grid, rows):
    assert masked_rows(grid) == rows


def test_infilling_scores_the_model_against_a_spliced_baseline():
    model = toy("pretrain")
    rng = np.random.default_rng(0)
    size = model.image_size
    documents = [
        {
            "id": f"doc{i}",
            "caption": "a red circle at the top",
            "image_ids": IMAGE,
            "pixels": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        }
        for i in range(5)
    ]
    metrics, records = infilling_metrics(model, documents, Strategy.named("greedy"), None, 0)
    assert metrics["examples"] == 5 and metrics["masked_rows"] == [2, 6]
    assert "accuracy" not in metrics and "similarity_dual_encoder" not in metrics  # no judge, no
    # retriever on the toy model; the pixel metrics need neither
    assert 0 <= metrics["region_mse"] <= 1 and metrics["spliced_region_mse"] > 0.05  # noise
    assert [r["image_id"] for r in records] == [d["id"] for d in documents]
    assert all(r["image"].shape == (size, size, 3) for r in records)
    again, _ = infilling_metrics(model, documents, Strategy.named("greedy"), None, 0)
    assert again == metrics  # seeded: the same numbers
    with pytest.raises(ValueError, match="at least 2"):
        infilling_metrics(model, documents[:1], Strategy.named("greedy"), None, 0)


def test_the_scored_region_follows_the_token_order():
    model = toy("pretrain")
    size = model.image_size
    raster = masked_region(model.vq, 8, 2, 6, size)
    expected = np.zeros((size, size), dtype=bool)
    expected[2 * size // 8 : 6 * size // 8] = True  # rows 2-5 of the code grid
    assert np.array_equal(raster, expected)
    model.vq.config = dataclasses.replace(model.vq.config, token_order="hilbert")
    # sequence positions 16..47 of an 8x8 Hilbert curve: its bottom-left and bottom-right
    # quadrants, the bottom half of the image
    expected = np.zeros((size, size), dtype=bool)
    expected[size // 2 :] = True
    assert np.array_equal(masked_region(model.vq, 8, 2, 6, size), expected)
