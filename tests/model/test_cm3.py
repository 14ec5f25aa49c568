"""CM3 causal-masked transform: exact layouts, invariants over random documents, inversion."""

from __future__ import annotations

import numpy as np
import pytest

from cm3leon.config import CM3Config
from cm3leon.model.cm3 import MaskedDocument, cm3_mask_spans, cm3_unmask, segments
from cm3leon.tokenizers.vocab import Vocab

VOCAB = Vocab(text_size=50, image_size=16, num_sentinels=16)
TEXT = VOCAB.text_to_vocab(range(50))
IMAGE = VOCAB.image_to_vocab(range(16))
BRK, EOS, EOS_SPAN = VOCAB.brk, VOCAB.eos, VOCAB.eos_span
M0, M1 = VOCAB.sentinel(0), VOCAB.sentinel(1)
ALWAYS_ONE_SPAN = CM3Config(min_spans=1, max_spans=1, unmasked_fraction=0.0)


def test_single_token_segment_forces_the_layout():
    # The only maskable token is the caption's one token: the span is fixed whatever the rng.
    document = [TEXT[7], BRK]
    masked = cm3_mask_spans(document, VOCAB, ALWAYS_ONE_SPAN, np.random.default_rng(0))
    assert masked == MaskedDocument(
        ids=[M0, BRK, M0, TEXT[7], EOS_SPAN],
        loss_weights=[0.0, 1.0, 0.0, 1.0, 1.0],
        spans=[(0, 1)],
        source=[-1, 1, -1, 0, -1],
    )
    assert cm3_unmask(masked.ids, VOCAB) == document


def test_seeded_example_by_hand():
    # caption t0..t4 <break> image i0..i3; two spans of length <= 3. With seed 2 the draws put
    # span 0 on t2 t3 t4 and span 1 on i0 i1.
    document = [*TEXT[:5], BRK, *IMAGE[:4]]
    config = CM3Config(min_spans=2, max_spans=2, max_span_length=3, unmasked_fraction=0.0)
    masked = cm3_mask_spans(document, VOCAB, config, np.random.default_rng(2))
    assert masked.spans == [(2, 5), (6, 8)]
    assert masked.ids == [
        TEXT[0], TEXT[1], M0, BRK, M1, IMAGE[2], IMAGE[3],
        M0, TEXT[2], TEXT[3], TEXT[4], EOS_SPAN,
        M1, IMAGE[0], IMAGE[1], EOS_SPAN,
    ]  # fmt: skip
    assert masked.loss_weights == [1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1]
    # Deterministic given the rng.
    again = cm3_mask_spans(document, VOCAB, config, np.random.default_rng(2))
    assert again == masked


def test_segments_are_maximal_runs_of_non_special_tokens():
    document = [BRK, TEXT[1], TEXT[2], BRK, BRK, IMAGE[0], EOS, TEXT[3]]
    assert segments(document, VOCAB) == [(1, 3), (5, 6), (7, 8)]
    assert segments([BRK, EOS], VOCAB) == []


def random_document(rng: np.random.Generator) -> list[int]:
    """Several documents' worth of shapes: empty, specials only, tiny and long segments."""
    pieces: list[int] = []
    for _ in range(int(rng.integers(0, 5))):
        kind = rng.integers(0, 4)
        if kind == 0:
            pieces.append(int(rng.choice([BRK, EOS, VOCAB.bos, VOCAB.reserved(0)])))
        elif kind == 1:
            pieces += [int(t) for t in rng.choice(TEXT, size=int(rng.integers(1, 4)))]
        else:
            pieces += [int(t) for t in rng.choice(IMAGE + TEXT, size=int(rng.integers(1, 40)))]
        if rng.random() < 0.5:
            pieces.append(BRK)
    return pieces


def check_invariants(document: list[int], masked: MaskedDocument, config: CM3Config) -> None:
    n = len(masked.spans)
    assert len(masked.ids) == len(masked.loss_weights)
    # Each span: one sentinel in place, one opening its copy, one <eos_span>.
    assert len(masked.ids) == len(document) + 3 * n
    # Spans: non-empty, non-overlapping, sorted, inside one segment, within max_span_length
    # (or, for a null condition, the whole first segment).
    runs = segments(document, VOCAB)
    for start, end in masked.spans:
        whole_first = config.null_condition_fraction > 0 and (start, end) == runs[0]
        assert 1 <= end - start <= config.max_span_length or whole_first
        assert any(s <= start and end <= e for s, e in runs), "span crosses a special token"
        assert not any(VOCAB.is_special(t) for t in document[start:end])
    for (_, end), (start, _) in zip(masked.spans, masked.spans[1:], strict=False):
        assert end <= start
    assert n <= min(config.max_spans, VOCAB.num_sentinels)
    # Sentinels: 0..n-1 in order in the body, then again opening each appended span.
    found = [t for t in masked.ids if t in {VOCAB.sentinel(i) for i in range(16)}]
    assert found == [VOCAB.sentinel(i) for i in range(n)] * 2
    # Weights are zero exactly at sentinel positions.
    for token, weight in zip(masked.ids, masked.loss_weights, strict=True):
        is_sentinel = VOCAB.is_special(token) and VOCAB.token_name(token).startswith("<mask:")
        assert weight == (0.0 if is_sentinel else 1.0)
    assert masked.ids.count(EOS_SPAN) == n
    assert masked.ids.count(BRK) == document.count(BRK)
    assert cm3_unmask(masked.ids, VOCAB) == document
    # Every original token appears once, and source says where it came from.
    assert len(masked.source) == len(masked.ids)
    assert sorted(j for j in masked.source if j >= 0) == list(range(len(document)))
    for token, j in zip(masked.ids, masked.source, strict=True):
        assert token == document[j] if j >= 0 else token in (EOS_SPAN, *sentinels(n))


def sentinels(n: int) -> list[int]:
    return [VOCAB.sentinel(i) for i in range(n)]


CONFIGS = [
    CM3Config(),
    CM3Config(poisson_lambda=3.0, min_spans=1, max_spans=4, max_span_length=2),
    CM3Config(poisson_lambda=40.0, min_spans=10, max_spans=40, unmasked_fraction=0.0),
    CM3Config(min_spans=0, max_spans=3, max_span_length=1, unmasked_fraction=0.5),
    CM3Config(null_condition_fraction=0.5, max_span_length=4),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_invariants_and_inverse_over_random_documents(config):
    rng = np.random.default_rng(1234)
    masked_any = False
    for _ in range(400):
        document = random_document(rng)
        masked = cm3_mask_spans(document, VOCAB, config, rng)
        check_invariants(document, masked, config)
        masked_any |= bool(masked.spans)
    assert masked_any


def test_more_spans_than_fit_are_capped():
    # Three maskable tokens, twenty one-token spans requested: every token becomes a span.
    config = CM3Config(min_spans=20, max_spans=20, max_span_length=1, unmasked_fraction=0.0)
    document = [TEXT[1], BRK, IMAGE[2], IMAGE[3]]
    masked = cm3_mask_spans(document, VOCAB, config, np.random.default_rng(5))
    assert masked.spans == [(0, 1), (2, 3), (3, 4)]
    assert masked.ids[:4] == [M0, BRK, M1, VOCAB.sentinel(2)]
    assert cm3_unmask(masked.ids, VOCAB) == document
    # Longer spans: drawing stops once every maskable token is taken.
    config = CM3Config(min_spans=20, max_spans=20, unmasked_fraction=0.0)
    for seed in range(20):
        masked = cm3_mask_spans(document, VOCAB, config, np.random.default_rng(seed))
        assert sum(end - start for start, end in masked.spans) == 3
        assert cm3_unmask(masked.ids, VOCAB) == document
    # ... and by the number of sentinels the vocabulary has.
    small = Vocab(text_size=50, image_size=16, num_sentinels=2)
    long_document = small.text_to_vocab(range(30))
    masked = cm3_mask_spans(long_document, small, config, np.random.default_rng(5))
    assert len(masked.spans) == 2
    assert cm3_unmask(masked.ids, small) == long_document


def test_documents_without_maskable_tokens_are_unchanged():
    for document in ([], [BRK], [BRK, EOS, BRK]):
        masked = cm3_mask_spans(document, VOCAB, ALWAYS_ONE_SPAN, np.random.default_rng(0))
        assert masked == MaskedDocument(
            ids=document,
            loss_weights=[1.0] * len(document),
            spans=[],
            source=list(range(len(document))),
        )


def test_unmasked_fraction_one_is_identity():
    config = CM3Config(unmasked_fraction=1.0, min_spans=3, max_spans=3)
    rng = np.random.default_rng(0)
    for _ in range(50):
        document = random_document(rng)
        masked = cm3_mask_spans(document, VOCAB, config, rng)
        assert masked.ids == document and masked.spans == []
        assert masked.loss_weights == [1.0] * len(document)


def test_unmasked_rate_and_span_count_distribution():
    config = CM3Config(unmasked_fraction=0.3, poisson_lambda=1.0, min_spans=1, max_spans=16)
    rng = np.random.default_rng(7)
    document = [*TEXT[:40], BRK, *IMAGE[:16] * 4]
    counts = [len(cm3_mask_spans(document, VOCAB, config, rng).spans) for _ in range(4000)]
    counts = np.array(counts)
    # Binomial(4000, 0.3): std 0.007; allow ~4 std.
    assert np.mean(counts == 0) == pytest.approx(0.3, abs=0.03)
    # Masked documents: n = max(Poisson(1), 1), mean 1 + e^-1.
    assert counts[counts > 0].mean() == pytest.approx(1 + np.exp(-1), abs=0.06)


def test_null_condition_masks_the_whole_caption_as_span_0():
    # The unconditional prompt of CFG (`<mask:0> <break>` + image) is a training document.
    document = [*TEXT[:30], BRK, *IMAGE[:16]]
    config = CM3Config(null_condition_fraction=0.25, max_span_length=4, unmasked_fraction=0.0)
    rng = np.random.default_rng(3)
    whole = []
    for _ in range(2000):
        masked = cm3_mask_spans(document, VOCAB, config, rng)
        whole.append(masked.spans[0] == (0, 30))
        if whole[-1]:
            assert masked.ids[:2] == [M0, BRK]
            assert masked.ids[masked.ids.index(M0, 1) : masked.ids.index(M0, 1) + 31] == [
                M0,
                *TEXT[:30],
            ]
        assert cm3_unmask(masked.ids, VOCAB) == document
    # Binomial(2000, 0.25): std 0.0097 (a random span of <= 4 tokens never covers 30).
    assert np.mean(whole) == pytest.approx(0.25, abs=0.04)


def test_rejects_documents_that_already_hold_cm3_tokens():
    with pytest.raises(ValueError, match="already holds CM3 token <mask:0>"):
        cm3_mask_spans([TEXT[0], M0], VOCAB, ALWAYS_ONE_SPAN, np.random.default_rng(0))


@pytest.mark.parametrize(
    "ids",
    [
        [TEXT[0], M0, TEXT[1]],  # sentinel without its appended span
        [M0, BRK, M0, TEXT[1]],  # no <eos_span>
        [M0, BRK, M0, TEXT[1], EOS_SPAN, TEXT[2]],  # trailing tokens
        [M1, BRK, M1, TEXT[1], EOS_SPAN],  # numbering does not start at 0
        [TEXT[1], EOS_SPAN],  # <eos_span> without sentinels
    ],
)
def test_unmask_rejects_malformed_documents(ids):
    with pytest.raises(ValueError, match="CM3 document"):
        cm3_unmask(ids, VOCAB)
