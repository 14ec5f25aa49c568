"""Logit processors against hand-computed values (CM3Leon §3; STYLE.md §12)."""

from __future__ import annotations

import math

import pytest
import torch

from cm3leon.decoding.processors import (
    ClassifierFreeGuidance,
    ContrastiveDecodingK,
    ModalityConstraint,
    Temperature,
    TopP,
    image_run_lengths,
)
from cm3leon.decoding.selector import Strategy, TokenSelector
from cm3leon.tokenizers.vocab import Vocab

VOCAB = Vocab(text_size=5, image_size=4, num_sentinels=2, num_reserved=0)  # 8 specials


def test_cfg_weight_one_is_the_conditional_stream():
    cond, uncond = torch.randn(3, 10), torch.randn(3, 10)
    assert torch.equal(ClassifierFreeGuidance(1.0)(cond, uncond), cond)
    assert torch.allclose(ClassifierFreeGuidance(0.0)(cond, uncond), uncond, atol=1e-6)


def test_cfg_hand_computed_and_keeps_masked_tokens():
    cond = torch.tensor([[2.0, 1.0, float("-inf")]])
    uncond = torch.tensor([[1.0, 1.5, float("-inf")]])
    out = ClassifierFreeGuidance(3.0)(cond, uncond)
    # uncond + 3 (cond - uncond): 1 + 3*1 = 4; 1.5 + 3*(-0.5) = 0; masked stays -inf (not nan)
    assert out[0, 0].item() == 4.0 and out[0, 1].item() == 0.0
    assert math.isinf(out[0, 2].item()) and out[0, 2].item() < 0


def test_cd_k_keeps_exactly_the_kth_max_head():
    p_cond = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    p_uncond = torch.tensor([[0.1, 0.4, 0.2, 0.2, 0.1]])
    # k = 2: second largest p_cond = 0.3; alpha = 0.5 -> keep p_cond >= 0.15: tokens 0, 1, 2
    out = ContrastiveDecodingK(alpha=0.5, k=2)(p_cond.log(), p_uncond.log())
    kept = torch.isfinite(out[0])
    assert kept.tolist() == [True, True, True, False, False]
    expected = (p_cond.log() - p_uncond.log())[0, :3]
    assert torch.allclose(out[0, :3], expected, atol=1e-6)
    # token 0: log(0.4/0.1) beats token 1: log(0.3/0.4) although p_cond ranks them the same way
    assert out[0].argmax().item() == 0


def test_cd_k_head_always_holds_k_tokens():
    logits = torch.tensor([[5.0, 0.0, 0.0, -9.0]])
    out = ContrastiveDecodingK(alpha=1.0, k=3)(logits, torch.zeros_like(logits))
    assert torch.isfinite(out[0]).sum().item() == 3


def test_top_p_keeps_the_minimal_set():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = TopP(0.8)(probs.log())
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]  # 0.5 + 0.3 >= 0.8
    out = TopP(0.81)(probs.log())
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False]
    out = TopP(0.4)(probs.log())
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]  # the top token alone
    # unsorted input: the set is chosen by probability, not by position
    shuffled = probs[:, [2, 0, 3, 1]].log()
    assert torch.isfinite(TopP(0.8)(shuffled)[0]).tolist() == [False, True, False, True]


def test_temperature_divides():
    assert torch.equal(Temperature(2.0)(torch.tensor([[2.0, 4.0]])), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError):
        Temperature(0.0)


def test_image_run_lengths():
    img = VOCAB.image_offset
    ids = torch.tensor([[1, img, img + 1], [img, img, img], [img, 3, VOCAB.text_offset]])
    assert image_run_lengths(ids, VOCAB).tolist() == [2, 3, 0]


def test_modality_constraint_image_segment_counts_exactly():
    constraint = ModalityConstraint(VOCAB, image_tokens=3, output="image", stops=(VOCAB.eos,))
    run = torch.zeros(2, dtype=torch.long)
    allowed = constraint.allowed(run, torch.tensor([0, 3]))
    image = set(range(VOCAB.image_offset, VOCAB.size))
    assert set(allowed[0].nonzero().flatten().tolist()) == image
    assert allowed[1].nonzero().flatten().tolist() == [VOCAB.eos]


def test_modality_constraint_text_and_any():
    text = ModalityConstraint(VOCAB, 3, "text", (VOCAB.eos,))
    allowed = text.allowed(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))[0]
    assert set(allowed.nonzero().flatten().tolist()) == {
        VOCAB.eos,
        *range(VOCAB.text_offset, VOCAB.image_offset),
    }
    free = ModalityConstraint(VOCAB, 3, "any", (VOCAB.eos,))
    allowed = free.allowed(torch.tensor([0, 1, 3]), torch.zeros(3, dtype=torch.long))
    image = torch.zeros(VOCAB.size, dtype=torch.bool)
    image[VOCAB.image_offset :] = True
    assert allowed[0].all()  # outside an image anything goes
    assert torch.equal(allowed[1], image)  # inside a started image: only image ids
    assert not (allowed[2] & image).any() and allowed[2][VOCAB.brk]  # full image: back to text


def test_strategy_composition_and_validation():
    cond = torch.randn(2, 6)
    greedy = Strategy.named("greedy", cfg_weight=1.0)
    assert not greedy.needs_unconditional
    assert torch.equal(greedy.scores(cond, None), cond)
    assert (
        Strategy.named("cd_k").needs_unconditional
        and Strategy.named("top_p", cfg_weight=2.0).needs_unconditional
    )
    with pytest.raises(ValueError, match="unknown decoding strategy"):
        Strategy.named("beam")
    with pytest.raises(ValueError, match="top_p"):
        Strategy.named("top_p", top_p=0.0)


def test_selector_is_seeded_and_greedy_is_argmax():
    scores = torch.randn(4, 50)
    a = TokenSelector(7)(scores)
    b = TokenSelector(7)(scores)
    assert torch.equal(a, b)
    assert torch.equal(TokenSelector(0)(scores, greedy=True), scores.argmax(-1))
    masked = scores.clone()
    masked[:, 1:] = float("-inf")
    assert TokenSelector(3)(masked).tolist() == [0, 0, 0, 0]  # never a -inf token
