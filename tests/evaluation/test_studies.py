"""The text-to-image pool the headline and the studies share: one draw per setting."""

from __future__ import annotations

import numpy as np
import pytest

from cm3leon.config import DecodingConfig
from cm3leon.evaluation.studies import TextToImagePool, generator_columns, paired_columns
from cm3leon.inference.multimodal import Generation, first_samples
from tests.inference.test_multimodal import toy


def test_first_samples_keeps_a_prefix_and_re_ranks_within_it():
    codes = [[1], [2], [3], [4]]
    generation = Generation(
        "text_to_image",
        [[10], [20], [30], [40]],
        ["top_p"] * 4,
        3,
        [0.1, 0.5, 0.2, 0.9],
        [],
        codes=[4],
        sample_codes=codes,
    )
    two = first_samples(generation, 2)
    assert two.samples == [[10], [20]] and two.rerank_scores == [0.1, 0.5]
    assert two.best == 1 and two.codes == [2] and two.sample_codes == [[1], [2]]
    assert generation.best == 3 and len(generation.samples) == 4  # the original is untouched
    with pytest.raises(ValueError, match=r"need 1\.\.4 samples"):
        first_samples(generation, 5)


def test_a_setting_is_drawn_once_with_the_most_samples_reserved():
    model = toy("pretrain")
    documents = [{"caption": f"a red circle number {i}"} for i in range(5)]
    pool = TextToImagePool(model, documents, DecodingConfig(), seed=3)
    pool.reserve("top_p", 1.5, 0, 4)
    headline = pool.get("top_p", 1.5, 0, 2, 5)
    assert pool.rows_generated == 5 * 4  # the reserved 4 samples, not the 2 asked for
    assert [len(g.samples) for g in headline] == [2] * 5
    study = pool.get("top_p", 1.5, 0, 4, 3)
    assert pool.rows_generated == 20  # reused: the first 3 prompts of the same draw
    assert [g.samples[:2] for g in study] == [g.samples for g in headline[:3]]
    pool.get("top_p", 1.0, 0, 2, 5)  # another CFG weight is another setting
    assert pool.rows_generated == 20 + 10
    pool.get("top_p", 1.0, 0, 4, 3)  # more samples on fewer prompts: redrawn on all 5
    assert pool.rows_generated == 30 + 20
    assert len(pool.get("top_p", 1.0, 0, 4, 5)) == 5 and pool.rows_generated == 50
    with pytest.raises(ValueError, match="holds 5 documents"):
        pool.get("top_p", 1.5, 0, 2, 6)


def test_generator_columns_split_the_generator_from_the_re_ranker():
    right = np.array(
        [
            [False, True, False, False],  # one object: right at the second sample
            [True, True, True, True],  # one object: always right
            [False, False, False, True],  # two objects: right only at the fourth
            [False, False, False, False],  # two objects: never
        ]
    )
    objects = np.array([1, 1, 2, 2])
    one = generator_columns(right, objects, 1)
    assert one["sample_accuracy"] == 0.25 and one["oracle_accuracy"] == 0.25
    assert one["oracle_accuracy_1_objects"] == 0.5 and one["oracle_accuracy_2_objects"] == 0
    four = generator_columns(right, objects, 4)
    assert four["sample_accuracy"] == 0.375  # 6 right of 16
    assert four["sample_accuracy_1_objects"] == 0.625 and four["sample_accuracy_2_objects"] == 0.125
    assert four["oracle_accuracy"] == 0.75 and four["oracle_accuracy_2_objects"] == 0.5


def test_paired_columns_need_right_or_wrong_records_on_the_same_rows():
    first = [{"correct": c} for c in (True, True, False, True)]
    second = [{"correct": c} for c in (True, False, False, False)]
    columns = paired_columns(first, second, "gain")
    assert columns["gain"] == 0.5  # 3/4 - 1/4
    assert columns["gain_low"] < 0.5 < columns["gain_high"]
    assert paired_columns(first, second[:3], "gain") == {}  # rows do not pair up
    assert paired_columns([{"iou": 0.5}] * 4, second, "gain") == {}  # not right-or-wrong
