"""Batched autoregressive generation with CFG streams and a KV cache (DESIGN.md §9).

:func:`generate` decodes one segment (an image, a caption, an answer, an infilled span) for many
requests at once. Each request has a conditional prompt, optionally an unconditional one (the
prompt text replaced by the mask token, for CFG and CD-K) and its own :class:`Strategy`, so one
batch can mix strategies (e.g. half top-p, half CD-K). All streams of all requests go through
*one* forward per step: rows are left-padded to a common length (``pad_mask``) and extended
together in the cache; a request's chosen token is appended to both of its streams.

With ``use_cache=False`` every step recomputes the whole padded sequence instead (the benchmark
baseline and the test that cached and uncached decoding agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cm3leon.decoding.processors import ModalityConstraint, image_run_lengths
from cm3leon.decoding.selector import Strategy, TokenSelector
from cm3leon.model.transformer import DecoderLM
from cm3leon.tokenizers.vocab import Vocab


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Sequence[int]
    strategy: Strategy
    unconditional: Sequence[int] | None = None  # required when the strategy needs it


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, pad_mask)``, both ``(B, T)``, rows right-aligned."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row) :] = torch.tensor(list(row))
            mask[i, length - len(row) :] = True
    return ids, mask


@torch.no_grad()
def generate(
    model: DecoderLM,
    vocab: Vocab,
    requests: Sequence[GenerationRequest],
    constraint: ModalityConstraint,
    max_new_tokens: int,
    seed: int,
    use_cache: bool = True,
) -> list[list[int]]:
    """Generated ids of each request, up to (not including) its stop token."""
    if not requests:
        return []
    device = model.head.weight.device
    constraint = constraint.to(device)
    stops = set(constraint.stop.nonzero().flatten().tolist())
    rows = [list(r.prompt) for r in requests]
    uncond_row = {}
    for i, r in enumerate(requests):
        if r.strategy.needs_unconditional:
            if r.unconditional is None:
                raise ValueError(f"request {i} uses {r.strategy} but has no unconditional prompt")
            uncond_row[i] = len(rows)
            rows.append(list(r.unconditional))
    longest = max(len(r) for r in rows) + max_new_tokens - 1  # the last token is never fed
    if longest > model.shape.max_seq_len:
        raise ValueError(
            f"a prompt plus {max_new_tokens} new tokens needs {longest} positions but the model's "
            f"context is {model.shape.max_seq_len}; retrieve fewer documents or shorten the prompt"
        )
    ids, pad_mask = left_pad(rows, vocab.pad)
    ids, pad_mask = ids.to(device), pad_mask.to(device)
    n = len(requests)
    cond_index = torch.arange(n, device=device)
    uncond_index = torch.tensor([uncond_row.get(i, i) for i in range(n)], device=device)
    with_uncond = torch.tensor(list(uncond_row), dtype=torch.long, device=device)  # (U,)
    members: dict[Strategy, list[int]] = {}
    for i, r in enumerate(requests):
        members.setdefault(r.strategy, []).append(i)
    groups = {s: torch.tensor(rows_, device=device) for s, rows_ in members.items()}
    selector = TokenSelector(seed, device)

    cache = model.new_cache(len(rows), ids.shape[1] + max_new_tokens - 1) if use_cache else None
    logits = model(ids, kv_cache=cache, pad_mask=pad_mask)[:, -1]  # (R, V)
    run = image_run_lengths(ids[:n], vocab)  # (n,) trailing image tokens, kept up to date
    generated = torch.zeros(n, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in range(n)]
    for position in range(max_new_tokens):
        allowed = constraint.allowed(run, generated)  # (n, V)
        # Only the tokens some request may take now: an image step scores its 256 codes, not
        # the whole vocabulary. Disallowed tokens are -inf in every processor's input and output,
        # so this changes no distribution; greedy picks the same token, sampling draws its
        # noise over the kept columns only.
        columns = allowed.any(0).nonzero().squeeze(1)  # (U,) ascending; a device sync
        allowed = allowed[:, columns]
        logits = logits.index_select(1, columns)  # (R, U)
        cond = logits[cond_index].float().masked_fill(~allowed, float("-inf"))
        uncond = logits[uncond_index].float().masked_fill(~allowed, float("-inf"))
        scores = torch.empty_like(cond)
        greedy = torch.zeros(n, dtype=torch.bool, device=device)
        for strategy, rows_ in groups.items():
            scores[rows_] = strategy.scores(cond[rows_], uncond[rows_])
            greedy[rows_] = strategy.argmax
        token = columns[selector(scores, greedy)]  # (n,) vocabulary ids
        token = torch.where(done, torch.full_like(token, vocab.pad), token)
        was_done = done.tolist()
        for i, t in enumerate(token.tolist()):  # the step's second device sync
            if was_done[i]:
                continue
            if t in stops:
                done[i] = True
            else:
                outputs[i].append(t)
        generated += (~done).long()
        run = torch.where(vocab.image_mask(token), run + 1, torch.zeros_like(run))
        if bool(done.all()) or position == max_new_tokens - 1:
            break  # nothing left to feed: the last token's logits are never needed
        step = torch.cat([token, token[with_uncond]])  # (R,): each stream gets its request's token
        step_mask = torch.cat([~done, ~done[with_uncond]])
        if use_cache:
            logits = model(step[:, None], kv_cache=cache, pad_mask=step_mask[:, None])[:, -1]
        else:
            ids = torch.cat([ids, step[:, None]], 1)
            pad_mask = torch.cat([pad_mask, step_mask[:, None]], 1)
            logits = model(ids, pad_mask=pad_mask)[:, -1]
    return outputs
