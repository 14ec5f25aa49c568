"""Retrieval-augmented sequence assembly, loss weights, collation and the sample stream."""

import pytest
import torch

from cm3leon.config import CM3Config, PretrainConfig
from cm3leon.model.cm3 import cm3_unmask
from cm3leon.model.transformer import DecoderLM, TransformerShape
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.training.loop import training_loss, weighted_loss
from cm3leon.training.pretraining import train_sample
from cm3leon.training.sequences import (
    RetrievalAugmentedSequences,
    TokenDocument,
    collate,
    document_of,
    sample_indices,
)

VOCAB = Vocab(text_size=20, image_size=8, num_sentinels=16)


def doc(text, image):
    return TokenDocument(
        ((*VOCAB.text_to_vocab(text),), (*VOCAB.text_to_vocab(text[::-1]),)),
        tuple(VOCAB.image_to_vocab(image)),
    )


BANK = [doc([1, 2], [0, 1, 2, 3]), doc([3], [4, 5, 6, 7]), doc([4, 5, 6], [1, 1, 1, 1])]
DOCS = [doc([7, 8, 9], [7, 6, 5, 4]), doc([10], [0, 0, 0, 0])]
NEIGHBORS = [[2, 0], [1]]


def sequences(**overrides):
    config = PretrainConfig(**{"cm3": CM3Config(unmasked_fraction=1.0), **overrides})
    return RetrievalAugmentedSequences(DOCS, NEIGHBORS, BANK, VOCAB, config, max_seq_len=64, seed=0)


def test_layout_with_neighbors_each_followed_by_eos():
    s = sequences(retrieved_loss_weight=0.5).build(0, k=2, augment=False)
    n2 = [*BANK[2].paraphrases[0], VOCAB.brk, *BANK[2].image, VOCAB.eos]
    n0 = [*BANK[0].paraphrases[0], VOCAB.brk, *BANK[0].image, VOCAB.eos]
    query = [*DOCS[0].paraphrases[0], VOCAB.brk, *DOCS[0].image, VOCAB.eos]
    assert s.ids == [VOCAB.bos, *n2, *n0, *query]
    assert s.query_start == 1 + len(n2) + len(n0)
    assert s.weights == [0.0] + [0.5] * (len(n2) + len(n0)) + [1.0] * len(query)


def test_k_is_capped_by_available_neighbors_and_zero_means_no_retrieval():
    neighbor = (
        len(BANK[1].paraphrases[0]) + 1 + len(BANK[1].image) + 1
    )  # caption <break> image <eos>
    assert sequences().build(1, k=5, augment=False).query_start == 1 + neighbor
    plain = sequences().build(0, k=0, augment=False)
    assert plain.query_start == 1 and plain.ids[0] == VOCAB.bos


def test_sampled_k_stays_in_range_and_varies():
    ks = {
        RetrievalAugmentedSequences(DOCS, NEIGHBORS, BANK, VOCAB, PretrainConfig(), 64, seed)
        .build(0)
        .ids.count(VOCAB.eos)
        - 1
        for seed in range(30)
    }
    assert ks == {0, 1, 2}


def test_cm3_on_the_query_is_invertible_and_sentinels_weigh_zero():
    config = PretrainConfig(cm3=CM3Config(unmasked_fraction=0.0, min_spans=1))
    built = RetrievalAugmentedSequences(DOCS, NEIGHBORS, BANK, VOCAB, config, 64, seed=4)
    s = built.build(0, k=1, augment=False)
    query = s.ids[s.query_start : -1]
    assert cm3_unmask(query, VOCAB) == [*DOCS[0].paraphrases[0], VOCAB.brk, *DOCS[0].image]
    for token, weight in zip(s.ids, s.weights, strict=True):
        if VOCAB.sentinel_mask(torch.tensor([token])).item():
            assert weight == 0.0


def test_query_side_is_identical_with_or_without_retrieval():
    config = PretrainConfig(cm3=CM3Config(unmasked_fraction=0.0))
    a = RetrievalAugmentedSequences(DOCS, NEIGHBORS, BANK, VOCAB, config, 64, seed=9).build(0, k=2)
    b = RetrievalAugmentedSequences(DOCS, NEIGHBORS, BANK, VOCAB, config, 64, seed=9).build(0, k=0)
    assert a.ids[a.query_start :] == b.ids[b.query_start :]


def test_neighbors_are_dropped_to_fit_and_a_too_long_query_is_an_error():
    config = PretrainConfig(cm3=CM3Config(unmasked_fraction=1.0))
    short = RetrievalAugmentedSequences(
        DOCS, NEIGHBORS, BANK, VOCAB, config, max_seq_len=20, seed=0
    )
    s = short.build(0, k=2, augment=False)
    assert len(s.ids) <= 20 and s.ids.count(VOCAB.eos) == 2  # one neighbor fits, not two
    tiny = RetrievalAugmentedSequences(DOCS, NEIGHBORS, BANK, VOCAB, config, max_seq_len=5, seed=0)
    with pytest.raises(ValueError, match=r"raise pretrain\.model\.max_seq_len"):
        tiny.build(0, k=0)


def test_collate_shifts_pads_and_marks_the_query():
    a = sequences().build(0, k=1, augment=False)
    b = sequences().build(1, k=0, augment=False)
    batch = collate([a, b], VOCAB.pad)
    assert batch.inputs.shape == (2, len(a.ids) - 1)
    assert batch.inputs[0].tolist() == a.ids[:-1] and batch.targets[0].tolist() == a.ids[1:]
    n = len(b.ids) - 1
    assert batch.weights[1, n:].sum() == 0 and (batch.targets[1, n:] == VOCAB.pad).all()
    assert batch.query[0].tolist().index(True) == a.query_start - 1
    assert batch.tokens == int(
        sum(w > 0 for w in a.weights[1:]) + sum(w > 0 for w in b.weights[1:])
    )


def test_collate_puts_the_longest_row_first_and_marks_real_inputs():
    short = sequences().build(1, k=0, augment=False)
    long = sequences().build(0, k=2, augment=False)
    middle = sequences().build(1, k=1, augment=False)
    batch = collate([short, long, middle], VOCAB.pad)
    assert [batch.inputs[i].tolist()[: len(s.ids) - 1] for i, s in enumerate((long, middle))] == [
        long.ids[:-1],
        middle.ids[:-1],
    ]
    assert batch.real.sum(1).tolist() == [len(s.ids) - 1 for s in (long, middle, short)]
    assert batch.real[2].tolist() == [True] * (len(short.ids) - 1) + [False] * (
        len(long.ids) - len(short.ids)
    )


def test_training_loss_is_the_weighted_loss_of_the_padded_forward():
    shape = TransformerShape(
        vocab_size=VOCAB.size, n_layer=2, n_head=2, d_model=16, max_seq_len=64,
        image_cells=4, image_offset=VOCAB.image_offset,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DecoderLM(shape)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    built = [sequences(retrieved_loss_weight=0.5).build(i % 2, k=i % 3) for i in range(5)]
    batch = collate(built, VOCAB.pad)
    padded = weighted_loss(model(batch.inputs, cells=batch.cells), batch)
    torch.testing.assert_close(training_loss(model, batch), padded, rtol=1e-5, atol=1e-6)


def test_weighted_loss_ignores_zero_weight_targets():
    batch = collate([sequences().build(0, k=1, augment=False)], VOCAB.pad)
    logits = torch.randn(*batch.inputs.shape, VOCAB.size)
    changed = logits.clone()
    zero = batch.weights[0] == 0
    changed[0, zero] = torch.randn(int(zero.sum()), VOCAB.size)
    assert torch.allclose(weighted_loss(logits, batch), weighted_loss(changed, batch))


def test_sample_stream_is_the_same_for_any_process_split():
    single = [sample_indices(s, 0, 0, 1, 8, 1, 50, seed=1) for s in range(10)]
    for s in range(10):
        split = sample_indices(s, 0, 0, 2, 4, 1, 50, 1) + sample_indices(s, 0, 1, 2, 4, 1, 50, 1)
        accumulated = sample_indices(s, 0, 0, 1, 4, 2, 50, 1) + sample_indices(
            s, 1, 0, 1, 4, 2, 50, 1
        )
        assert split == single[s] == accumulated
    first_epoch = [i for s in single[:7] for i in s][:50]
    assert sorted(first_epoch) == list(range(50))  # every document once per epoch


def counted_cells(ids: list[int]) -> list[int]:
    """What the model counts from the ids alone: each image id's place in its run."""
    cells, run = [], 0
    for token in ids:
        run = run + 1 if VOCAB.is_image(token) else 0
        cells.append(run)
    return cells


def test_cells_of_intact_documents_are_what_the_model_counts():
    s = sequences().build(0, k=2, augment=False)
    assert s.cells == counted_cells(s.ids)
    assert max(s.cells) == 4 and s.cells.count(1) == 3  # two neighbors and the query


def test_cells_follow_image_tokens_through_cm3_spans():
    # A masked image span moves to the end; its tokens keep their cells (the model could not
    # count them there), and the tokens after the sentinel keep theirs.
    config = {"cm3": CM3Config(min_spans=2, max_spans=2, unmasked_fraction=0.0)}
    built = sequences(**config)
    original = [*DOCS[0].paraphrases[0], VOCAB.brk, *DOCS[0].image]
    true_cell = dict(zip(DOCS[0].image, range(1, 5), strict=True))  # its image ids are distinct
    moved = 0
    for seed in range(60):
        for sample in (None, seed):
            s = RetrievalAugmentedSequences(
                DOCS, NEIGHBORS, BANK, VOCAB, built.config, 64, seed
            ).build(0, k=0, augment=False, sample=sample)
            assert len(s.cells) == len(s.ids)
            for token, cell in zip(s.ids, s.cells, strict=True):
                assert cell == (true_cell[token] if VOCAB.is_image(token) else 0)
            moved += s.cells != counted_cells(s.ids)
            assert cm3_unmask(s.ids[1:-1], VOCAB) == original
    assert moved > 0
    batch = collate([s, sequences().build(1, k=1, augment=False)], VOCAB.pad)
    assert batch.cells.shape == batch.inputs.shape
    assert batch.cells[0, : len(s.ids) - 1].tolist() == s.cells[:-1]


def test_length_grouping_draws_one_neighbor_count_per_step_with_the_same_marginal():
    built = RetrievalAugmentedSequences(
        DOCS * 50, NEIGHBORS * 50, BANK, VOCAB, PretrainConfig(), max_seq_len=64, seed=5
    )
    per_step, steps, seen = 4, 600, []
    for step in range(steps):
        k = built.neighbor_count(step)
        seen.append(k)
        for n in range(step * per_step, (step + 1) * per_step):
            s = train_sample(built, n, 5, per_step)
            available = len(NEIGHBORS[document_of(n, len(built), 5) % 2])
            assert s.ids[: s.query_start].count(VOCAB.eos) == min(k, available)
            assert train_sample(built, n, 5, per_step).ids == s.ids  # a pure function of n
    assert all(abs(seen.count(k) / steps - 1 / 3) < 0.06 for k in (0, 1, 2))  # uniform{0..2}
    # Without grouping each sample draws its own count, keyed by its number (the old stream).
    for n in range(40):
        s = train_sample(built, n, 5)
        available = len(NEIGHBORS[document_of(n, len(built), 5) % 2])
        assert s.ids[: s.query_start].count(VOCAB.eos) == min(built.neighbor_count(n), available)
