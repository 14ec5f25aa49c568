"""Evaluation metrics on toy inputs with hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from cm3leon.data import masks
from cm3leon.evaluation.metrics import (
    binarize_mask,
    caption_scores,
    caption_tokens,
    clip_score,
    clip_scores,
    frechet_distance,
    mask_iou,
    mean_interval,
    normalize_vqa_answer,
    paired_difference_interval,
    r_precision_hits,
    row_cosines,
    vqa_accuracy,
    wilson_interval,
)
from cm3leon.evaluation.tasks import score_vqa
from cm3leon.tasks import VQA

# ------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("the red car.", "red car"),
        # "one" is a number word in the official script, so this is "red 1", not "red one".
        ("the red one.", "red 1"),
        ("Yes!", "yes"),
        ("yes.", "yes"),
        ("  An\tapple\n", "apple"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Whats up?", "what's up"),
        ("don't", "don't"),  # the apostrophe is not in the official punctuation list
        ("3.5", "3.5"),  # a period followed by a digit is kept
        ("1,000", "1000"),  # digit-comma-digit: punctuation is deleted, not spaced
        ("dog, cat", "dog cat"),  # mark touching a space: deleted
        ("left-right", "left right"),  # mark not touching a space: replaced by a space
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_ten_answers() -> None:
    def answers(n_match: int) -> list[str]:
        return ["red"] * n_match + ["blue"] * (10 - n_match)

    # Leave-one-out over 10 answers: 1, 2, 3, 4 matches -> 0.3, 0.6, 0.9, 1.0.
    assert vqa_accuracy("red", answers(0)) == 0.0
    assert vqa_accuracy("red", answers(1)) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("red", answers(1)) == pytest.approx(0.3)
    assert vqa_accuracy("red", answers(2)) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("red", answers(2)) == pytest.approx(0.6)
    assert vqa_accuracy("red", answers(3)) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
    assert vqa_accuracy("red", answers(3)) == pytest.approx(0.9)
    assert vqa_accuracy("red", answers(4)) == pytest.approx(1.0)
    assert vqa_accuracy("red", answers(10)) == pytest.approx(1.0)


def test_vqa_accuracy_normalizes_both_sides() -> None:
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 10) == 1.0


def test_vqa_accuracy_other_lengths() -> None:
    # A single exact answer repeated 10 times: exact-match accuracy.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("no", ["yes"] * 10) == 0.0
    # One answer: no leave-one-out subset, min(1, 1/3).
    assert vqa_accuracy("yes", ["yes"]) == pytest.approx(1 / 3)
    # Five answers, two matching: subsets without a match (2) give 1/3, the other 3 give 2/3.
    assert vqa_accuracy("red", ["red", "red", "a", "b", "c"]) == pytest.approx(
        (2 * (1 / 3) + 3 * (2 / 3)) / 5
    )
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# ------------------------------------------------------------------------------ captioning


def test_caption_tokens() -> None:
    assert caption_tokens("  A Dog, running!\nFast.  ") == "a dog running fast"
    assert caption_tokens("don't stop_now 42") == "dont stopnow 42"


CAPTIONS = {
    "1": "A black dog runs on the grass.",
    "2": "Two birds fly over the sea.",
    "3": "A man rides a red bicycle.",
}


def test_caption_scores_identical() -> None:
    scores = caption_scores(CAPTIONS, {k: [v] for k, v in CAPTIONS.items()})
    assert set(scores) == {"cider_d", "bleu_4", "bleu_1"}
    assert scores["bleu_4"] == pytest.approx(1.0)
    assert scores["bleu_1"] == pytest.approx(1.0)
    # One reference per image and an exact match: cosine 1 at every n, no length penalty, x10.
    assert scores["cider_d"] == pytest.approx(10.0)


def test_caption_scores_wrong_caption_scores_lower() -> None:
    refs = {k: [v] for k, v in CAPTIONS.items()}
    good = caption_scores(CAPTIONS, refs)
    bad = caption_scores({**CAPTIONS, "3": "A woman eats a green apple."}, refs)
    assert bad["cider_d"] < good["cider_d"]
    assert bad["bleu_4"] < good["bleu_4"]
    assert bad["bleu_1"] < good["bleu_1"]


def test_caption_scores_hand_computed_bleu() -> None:
    # hyp "a cat sat on the mat" vs ref "a cat sat on a mat" (both 6 words, no brevity penalty):
    # clipped precisions 5/6, 3/5, 2/4, 1/3 -> BLEU-1 = 5/6, BLEU-4 = (1/12) ** (1/4).
    scores = caption_scores({"x": "A cat sat on the mat."}, {"x": ["a cat sat on a mat"]})
    assert scores["bleu_1"] == pytest.approx(5 / 6, rel=1e-6)
    assert scores["bleu_4"] == pytest.approx((1 / 12) ** 0.25, rel=1e-6)
    # A single image gives every n-gram idf 0, so CIDEr-D is 0.
    assert scores["cider_d"] == 0.0
    # Brevity penalty: 2 words against 6 -> exp(1 - 6/2), unigram precision 1.
    short = caption_scores({"x": "a cat"}, {"x": ["a cat sat on the mat"]})
    assert short["bleu_1"] == pytest.approx(math.exp(-2), rel=1e-6)


def test_caption_scores_errors() -> None:
    with pytest.raises(ValueError, match="'2'"):
        caption_scores({"1": "a dog", "2": "a cat"}, {"1": ["a dog"]})
    with pytest.raises(ValueError, match="'1'"):
        caption_scores({"1": "a dog"}, {"1": []})
    with pytest.raises(ValueError):
        caption_scores({}, {"1": ["a dog"]})


# --------------------------------------------------------------------------------- FID


def _exact_moments(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Samples whitened to sample mean exactly 0 and sample covariance exactly I."""
    x = rng.standard_normal((n, d))
    x -= x.mean(axis=0)
    chol = np.linalg.cholesky(np.cov(x, rowvar=False))
    return x @ np.linalg.inv(chol).T


def test_frechet_distance_self_is_zero() -> None:
    x = np.random.default_rng(0).standard_normal((200, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_exact_moments() -> None:
    rng = np.random.default_rng(1)
    d = 4
    m = np.array([1.0, -2.0, 0.5, 0.0])
    a = _exact_moments(rng, 50, d)
    b = 2.0 * _exact_moments(rng, 60, d) + m  # covariance 4 I
    # |m|^2 + Tr(I + 4I - 2 * sqrt(4I)) = |m|^2 + d
    assert frechet_distance(a, b) == pytest.approx(float(m @ m) + d, abs=1e-8)
    assert frechet_distance(b, a) == pytest.approx(float(m @ m) + d, abs=1e-8)


def test_frechet_distance_sampled_gaussians() -> None:
    rng = np.random.default_rng(2)
    m = np.array([1.0, 2.0, -1.0])
    a = rng.standard_normal((20_000, 3))
    b = rng.standard_normal((20_000, 3)) + m
    assert frechet_distance(a, b) == pytest.approx(float(m @ m), abs=0.2)


def test_frechet_distance_rank_deficient_is_finite() -> None:
    # Fewer rows than dims: singular covariances must still give a finite, ~non-negative value.
    rng = np.random.default_rng(3)
    value = frechet_distance(rng.standard_normal((5, 16)), rng.standard_normal((6, 16)))
    assert np.isfinite(value)
    assert value > -1e-6


def test_frechet_distance_errors() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        frechet_distance(np.ones((5, 3)), np.ones((5, 4)))


# --------------------------------------------------------------------------- CLIPScore


def test_clip_score() -> None:
    e = np.eye(3)
    assert clip_score(e, e) == pytest.approx(2.5)
    assert clip_score(e, 7.0 * e) == pytest.approx(2.5)  # scale-invariant
    assert clip_score(e, np.roll(e, 1, axis=0)) == pytest.approx(0.0)  # orthogonal
    assert clip_score(e[:1], -e[:1]) == 0.0  # negative cosine clipped at 0
    # cos 45 degrees and cos 0: mean of 2.5 * (1/sqrt2) and 2.5.
    t = np.array([[1.0, 0.0], [0.0, 3.0]])
    v = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert clip_score(t, v) == pytest.approx((2.5 / math.sqrt(2) + 2.5) / 2)
    assert clip_score(t, v, weight=1.0) == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    with pytest.raises(ValueError):
        clip_score(np.eye(3), np.eye(2))
    per_pair = clip_scores(t, v)  # what the evaluation's interval is taken over
    assert per_pair == pytest.approx([2.5 / math.sqrt(2), 2.5])
    assert clip_score(t, v) == pytest.approx(per_pair.mean())


# ------------------------------------------------------------------------------ masks


def test_mask_functions_are_the_data_layers() -> None:
    # One implementation (tests/data/test_masks.py); this module re-exports it for the tasks.
    assert mask_iou is masks.mask_iou
    assert binarize_mask is masks.binarize_mask


def test_wilson_interval_known_values_and_edges() -> None:
    # Brown, Cai & DasGupta (2001): 0/200 and 200/200 keep a width of ~0.019; 100/200 is the
    # normal interval to 3 decimals.
    assert wilson_interval(0, 200) == pytest.approx((0.0, 0.01885), abs=1e-4)
    assert wilson_interval(200, 200) == pytest.approx((0.98115, 1.0), abs=1e-4)
    assert wilson_interval(100, 200) == pytest.approx((0.4314, 0.5686), abs=1e-4)
    low, high = wilson_interval(180, 200)
    assert low < 0.9 < high and high - low < 0.09
    # More trials, narrower interval; no trials, no knowledge.
    assert np.subtract(*wilson_interval(450, 500)[::-1]) < high - low
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson_interval(5, 4)


def test_paired_difference_interval_signs_and_pairing() -> None:
    rng = np.random.default_rng(1)
    x = rng.random(800) < 0.55
    y = np.where(rng.random(800) < 0.8, x, rng.random(800) < 0.55)  # mostly the same outcomes
    difference, low, high = paired_difference_interval(x, y)
    assert difference == pytest.approx(x.mean() - y.mean())
    assert low < difference < high
    # Swapping the settings negates the interval.
    assert paired_difference_interval(y, x) == pytest.approx((-difference, -high, -low))
    # Pairing: narrower than the unpaired interval of the same marginals (phi = 0), which is
    # what the outcomes give when y's rows are shuffled against x's.
    unpaired = paired_difference_interval(x, rng.permutation(y))
    assert high - low < 0.6 * (unpaired[2] - unpaired[1])
    # The same outcomes twice: no difference, a narrow interval around 0.
    same = paired_difference_interval(x, x)
    assert same[0] == 0.0 and same[1] <= 0.0 <= same[2] and same[2] - same[1] < 0.01
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        paired_difference_interval(x, y[:-1])


def test_paired_difference_interval_covers_the_true_difference() -> None:
    """Coverage by simulation: 1,000 prompt sets of 300 correlated pairs with P(first) = 0.55,
    P(second) = 0.48; the 95% interval must hold the true 0.07 about 95% of the time (binomial
    sd 0.007 at 1,000 sets), where ignoring the pairing would cover nearly always."""
    rng = np.random.default_rng(2)
    covered, widths = 0, []
    for _ in range(1000):
        u = rng.random(300)
        x = u < 0.55
        y = np.where(rng.random(300) < 0.7, u < 0.48, rng.random(300) < 0.48)
        _, low, high = paired_difference_interval(x, y)
        covered += low <= 0.07 <= high
        widths.append(high - low)
    assert 0.93 <= covered / 1000 <= 0.97
    assert float(np.mean(widths)) < 0.12  # the unpaired interval is ~0.16 wide here


def test_mean_interval_covers_the_mean() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(0.6, 1.0, 400)
    low, high = mean_interval(values)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * values.std(ddof=1) / 20, rel=1e-3)
    assert mean_interval([]) == (0.0, 1.0)
    assert mean_interval([1.0, 1.0]) == (1.0, 1.0)
    # Unbounded (CLIPScore is in [0, 2.5]): not clipped to [0, 1]; one value has no spread.
    low, high = mean_interval([2.0, 2.4], bounds=None)
    assert low < 2.2 < high and high > 1.0
    assert mean_interval([2.2], bounds=None) == (2.2, 2.2)


def test_r_precision_by_hand_and_duplicate_captions_are_never_distractors():
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    images = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 1.0]])
    # image 0: own cos 1 > 0.71; image 1: own 0.10 < 0.995 (text 0); image 2: own 1 > 0.71
    hits, used = r_precision_hits(texts, images, ["a", "b", "c"], 100, np.random.default_rng(0))
    assert hits.tolist() == [True, False, True] and used == 3  # capped: 3 distinct texts
    # texts 0 and 1 say the same thing: neither is the other's distractor, so only 2 candidates
    hits, used = r_precision_hits(texts, images, ["a", "a", "c"], 100, np.random.default_rng(0))
    assert hits.tolist() == [True, False, True] and used == 2
    tie = r_precision_hits(
        texts[:2], np.array([[1.0, 1.0], [1.0, 1.0]]), ["a", "b"], 2, np.random.default_rng(0)
    )[0]
    assert tie.tolist() == [False, False]  # a tie with a distractor is a miss
    with pytest.raises(ValueError, match="two distinct texts"):
        r_precision_hits(texts[:2], images[:2], ["a", "a"], 10, np.random.default_rng(0))


def test_row_cosines_pairs_rows_and_ignores_scale():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[3.0, 0.0], [-1.0, -1.0], [5.0, 0.0]])
    assert np.allclose(row_cosines(a, b), [1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="one shape"):
        row_cosines(a, b[:2])


def test_vqa_rows_score_ten_answers_officially_and_a_short_list_by_any_match():
    rows = [
        {
            "image_id": "a",
            "question": "q",
            "answer": "red",
            "question_type": "color",
            "answers": ["red"] * 2 + ["blue"] * 8,
        },  # VQAv2: two of ten humans said red
        {
            "image_id": "b",
            "question": "q",
            "answer": "seven",
            "question_type": "",
            "answers": ["seven", "7"],
        },  # a manifest's list: any match is right
        {"image_id": "c", "question": "q", "answer": "no", "question_type": "", "answers": ["no"]},
    ]
    said = [SimpleNamespace(text=t) for t in ("red", "7", "yes")]
    metrics, records = score_vqa(None, VQA, rows, said, None, None, 0)
    assert metrics["accuracy"] == pytest.approx((0.6 + 1.0 + 0.0) / 3)
    assert set(metrics) >= {"accuracy_color"} and "accuracy_" not in metrics
    assert [r["correct"] for r in records] == [False, True, False]
    low, high = metrics["accuracy_ci95"]  # fractional credit: a mean's interval
    assert 0 <= low < metrics["accuracy"] < high <= 1
