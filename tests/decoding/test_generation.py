"""Batched generation: left padding, the KV cache, CFG streams and modality constraints."""

from __future__ import annotations

import pytest
import torch

from cm3leon.decoding.generation import GenerationRequest, generate, left_pad
from cm3leon.decoding.processors import ModalityConstraint
from cm3leon.decoding.selector import Strategy
from cm3leon.model.transformer import DecoderLM, TransformerShape
from cm3leon.tokenizers.vocab import Vocab

VOCAB = Vocab(text_size=12, image_size=10, num_sentinels=2, num_reserved=0)
SHAPE = TransformerShape(vocab_size=VOCAB.size, n_layer=2, n_head=2, d_model=16, max_seq_len=48)
GRID = 4  # image tokens per image in these tests
CELLS = TransformerShape(
    vocab_size=VOCAB.size,
    n_layer=2,
    n_head=2,
    d_model=16,
    max_seq_len=48,
    image_cells=GRID,
    image_offset=VOCAB.image_offset,
)
ROTARY = TransformerShape(**{**CELLS.to_dict(), "rotary": True})
SHAPES = pytest.mark.parametrize(
    "shape", [SHAPE, CELLS, ROTARY], ids=["plain", "image_cells", "rotary"]
)


def model(shape: TransformerShape = SHAPE) -> DecoderLM:
    torch.manual_seed(0)
    m = DecoderLM(shape).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)  # non-zero output projections: every block matters
    return m


def text(*ids: int) -> list[int]:
    return [VOCAB.text_offset + i for i in ids]


@SHAPES
def test_left_padded_rows_compute_what_they_compute_alone(shape):
    m = model(shape)
    image = [VOCAB.image_offset + c for c in (1, 2)]
    rows = [[VOCAB.bos, *text(1, 2, 3, 4, 5), *image], [VOCAB.bos, *text(6), VOCAB.brk, *image]]
    ids, mask = left_pad(rows, VOCAB.pad)
    batched = m(ids, pad_mask=mask)[:, -1]
    for i, row in enumerate(rows):
        alone = m(torch.tensor([row]))[0, -1]
        assert torch.allclose(batched[i], alone, atol=1e-5)
    # and through the cache, one token at a time after the padded prefill
    cache = m.new_cache(2, 12)
    m(ids, kv_cache=cache, pad_mask=mask)
    step = torch.tensor([[VOCAB.image_offset + 7], [VOCAB.text_offset + 8]])
    cached = m(step, kv_cache=cache)[:, -1]
    for i, row in enumerate(rows):
        alone = m(torch.tensor([[*row, int(step[i, 0])]]))[0, -1]
        assert torch.allclose(cached[i], alone, atol=1e-5)


def requests(strategies):
    prompts = [[VOCAB.bos, *text(1, 2, 3), VOCAB.brk], [VOCAB.bos, *text(4), VOCAB.brk]]
    uncond = [[VOCAB.bos, VOCAB.sentinel(0), VOCAB.brk]] * 2
    return [
        GenerationRequest(p, s, u) for p, u in zip(prompts, uncond, strict=True) for s in strategies
    ]


@SHAPES
@pytest.mark.parametrize("strategy", ["greedy", "top_p", "cd_k"])
def test_cached_and_uncached_generation_agree(strategy, shape):
    m = model(shape)
    plan = [Strategy.named(strategy, cfg_weight=2.5), Strategy.named("top_p", cfg_weight=1.0)]
    constraint = ModalityConstraint(VOCAB, GRID, "image", (VOCAB.eos,))
    cached = generate(m, VOCAB, requests(plan), constraint, GRID + 1, seed=3)
    uncached = generate(m, VOCAB, requests(plan), constraint, GRID + 1, seed=3, use_cache=False)
    assert cached == uncached
    for out in cached:  # exactly one image: GRID image ids, then the stop
        assert len(out) == GRID and all(VOCAB.is_image(t) for t in out)


def test_cfg_one_equals_plain_sampling_and_same_seed_repeats():
    m = model()
    constraint = ModalityConstraint(VOCAB, GRID, "image", (VOCAB.eos,))
    plain = [GenerationRequest(r.prompt, Strategy.named("top_p"), None) for r in requests([None])]
    with_uncond = requests([Strategy.named("top_p", cfg_weight=1.0)])
    a = generate(m, VOCAB, plain, constraint, GRID + 1, seed=5)
    b = generate(m, VOCAB, with_uncond, constraint, GRID + 1, seed=5)
    assert a == b == generate(m, VOCAB, plain, constraint, GRID + 1, seed=5)


@pytest.mark.parametrize("cfg_weight", [1.0, 2.5])
def test_greedy_is_the_argmax_over_the_whole_vocabulary(cfg_weight):
    """generate() scores only the tokens the constraint allows at a step; a reference that
    scores the whole vocabulary, constraint applied as a mask, picks the same tokens."""
    m = model()
    constraint = ModalityConstraint(VOCAB, GRID, "image", (VOCAB.eos,))
    reqs = requests([Strategy.named("greedy", cfg_weight=cfg_weight)])
    out = generate(m, VOCAB, reqs, constraint, GRID + 1, seed=0)
    for request, tokens in zip(reqs, out, strict=True):
        cond, uncond = list(request.prompt), list(request.unconditional)
        expected = []
        for position in range(GRID + 1):
            with torch.no_grad():
                c = m(torch.tensor([cond]))[0, -1]
                u = m(torch.tensor([uncond]))[0, -1]
            run = torch.tensor([position if position <= GRID else 0])
            allowed = constraint.allowed(run, torch.tensor([position]))[0]
            guided = u + cfg_weight * (c - u) if cfg_weight != 1.0 else c
            token = int(guided.masked_fill(~allowed, float("-inf")).argmax())
            if token == VOCAB.eos:
                break
            expected.append(token)
            cond, uncond = [*cond, token], [*uncond, token]
        assert tokens == expected


def test_text_segments_stop_and_never_hold_image_ids():
    m = model()
    constraint = ModalityConstraint(VOCAB, GRID, "text", (VOCAB.eos,))
    out = generate(m, VOCAB, requests([Strategy.named("top_p", top_p=1.0)]), constraint, 10, seed=1)
    for tokens in out:
        assert len(tokens) <= 10 and all(VOCAB.is_text(t) for t in tokens)


def test_strategy_needing_the_unconditional_stream_requires_it():
    m = model()
    constraint = ModalityConstraint(VOCAB, GRID, "image", (VOCAB.eos,))
    bad = [GenerationRequest([VOCAB.bos, VOCAB.brk], Strategy.named("cd_k"), None)]
    with pytest.raises(ValueError, match="unconditional prompt"):
        generate(m, VOCAB, bad, constraint, GRID + 1, seed=0)
    too_long = [GenerationRequest([VOCAB.bos] * 45, Strategy.named("greedy"), None)]
    with pytest.raises(ValueError, match="context"):
        generate(m, VOCAB, too_long, constraint, GRID + 1, seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generation_on_gpu_matches_cpu():
    m = model()
    plan = [Strategy.named("greedy", cfg_weight=2.0)]
    constraint = ModalityConstraint(VOCAB, GRID, "image", (VOCAB.eos,))
    on_cpu = generate(m, VOCAB, requests(plan), constraint, GRID + 1, seed=0)
    on_gpu = generate(m.cuda(), VOCAB, requests(plan), constraint, GRID + 1, seed=0)
    assert on_gpu == on_cpu
