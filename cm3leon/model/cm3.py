"""The CM3 causal-masked transform (Aghajanyan et al. 2022, §3; CM3Leon §2.3; DESIGN.md §7).

A document such as ``caption <break> image-tokens`` has a few spans cut out; each is replaced
in place by a sentinel ``<mask:i>`` and moved to the end as ``<mask:i> span <eos_span>``::

    a b c d <break> x y z      ->      a <mask:0> d <break> x y <mask:1> <mask:0> b c <eos_span>
                                       <mask:1> z <eos_span>

A left-to-right model trained on the result with the plain next-token loss learns both
generation and infilling (the span is predicted with both sides in context). Predicting a
sentinel carries weight 0 (:attr:`MaskedDocument.loss_weights`): where a span is cut is a
random choice, not something to learn.

Sampling, exactly (all draws from the given ``numpy.random.Generator``, in this order):

1. ``u = rng.random()``; if ``u < unmasked_fraction`` the document is left as is (n = 0).
2. Otherwise ``n = clip(rng.poisson(poisson_lambda), min_spans, max_spans)``, then capped by
   ``vocab.num_sentinels`` and by the number of non-special tokens (every span needs one).
3. The *free runs* start as the segments: maximal runs of non-special tokens, so a span never
   contains or crosses ``<break>``, ``<eos>`` or any other special token. Then, only when
   ``null_condition_fraction > 0``: ``rng.random() < null_condition_fraction`` makes the first
   span the whole first segment (the caption of ``caption <break> image``), so the document
   reads ``<mask:0> <break> image ... <mask:0> caption <eos_span>``: the masked-caption prompt
   of classifier-free guidance's unconditional stream, trained on purpose (as LlamaGen's
   ``class_dropout_prob``, Show-o's ``cond_dropout_prob``, Emu3's ``null_prompt_prob``); a
   span drawn at random covers a whole caption only by chance. For each of the remaining
   spans: pick a free run with probability proportional to its length
   (``rng.choice(..., p=...)``), a length ``rng.integers(1, min(max_span_length, run) + 1)``
   (uniform in ``[1, min(max_span_length, run length)]``), and a start uniform among the places
   it fits (``rng.integers``); the run left over on each side stays free. Spans therefore never
   overlap but may touch (``<mask:0> <mask:1>``). If earlier spans took every maskable token,
   drawing stops early with fewer than n spans.
4. Spans are numbered left to right.

Pass one document (or one retrieval-augmented sequence, whose ``<eos>`` separators are special
and so never crossed) without its final ``<eos>``; append that after the transformed ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cm3leon.config import CM3Config
from cm3leon.tokenizers.vocab import Vocab


@dataclass
class MaskedDocument:
    """A document after the CM3 transform.

    ``ids``: the transformed tokens. ``loss_weights[j]``: weight of the loss for *predicting*
    ``ids[j]`` (from ``ids[:j]``): 0.0 where ``ids[j]`` is a sentinel ``<mask:i>`` (both in place
    of its span and opening the appended span), 1.0 elsewhere. ``spans``: ``(start, end)``
    half-open positions of the masked spans in the original ids, left to right. ``source[j]``:
    the position in the original ids that ``ids[j]`` came from (-1 for the sentinels and
    ``<eos_span>``), so per-token facts of the document (an image token's cell) follow the
    tokens through the transform.
    """

    ids: list[int]
    loss_weights: list[float]
    spans: list[tuple[int, int]]
    source: list[int]


def segments(ids: Sequence[int], vocab: Vocab) -> list[tuple[int, int]]:
    """Maximal runs ``(start, end)`` of non-special tokens: the places a span may come from."""
    runs: list[tuple[int, int]] = []
    start = None
    is_special = vocab.is_special
    for position, token in enumerate(ids):
        if is_special(token):
            if start is not None:
                runs.append((start, position))
                start = None
        elif start is None:
            start = position
    if start is not None:
        runs.append((start, len(ids)))
    return runs


def cm3_mask_spans(
    ids: Sequence[int], vocab: Vocab, config: CM3Config, rng: np.random.Generator
) -> MaskedDocument:
    """Apply the CM3 transform to one document (sampling as in the module docstring)."""
    ids = [int(t) for t in ids]
    _reject_cm3_tokens(ids, vocab)
    free = segments(ids, vocab)
    capacity = sum(end - start for start, end in free)

    if rng.random() < config.unmasked_fraction:
        n = 0
    else:
        n = int(np.clip(rng.poisson(config.poisson_lambda), config.min_spans, config.max_spans))
        n = min(n, vocab.num_sentinels, capacity)

    spans: list[tuple[int, int]] = []
    if n and config.null_condition_fraction > 0 and rng.random() < config.null_condition_fraction:
        spans.append(free.pop(0))
    for _ in range(n - len(spans)):
        if not free:  # earlier spans took every maskable token
            break
        lengths = np.array([end - start for start, end in free], dtype=np.float64)
        run = int(rng.choice(len(free), p=lengths / lengths.sum()))
        run_start, run_end = free[run]
        length = int(rng.integers(1, min(config.max_span_length, run_end - run_start) + 1))
        start = int(rng.integers(run_start, run_end - length + 1))
        spans.append((start, start + length))
        leftover = [(run_start, start), (start + length, run_end)]
        free[run : run + 1] = [(s, e) for s, e in leftover if e > s]
    spans.sort()

    out: list[int] = []
    weights: list[float] = []
    source: list[int] = []
    position = 0
    for i, (start, end) in enumerate(spans):
        out += [*ids[position:start], vocab.sentinel(i)]
        weights += [1.0] * (start - position) + [0.0]
        source += [*range(position, start), -1]
        position = end
    out += ids[position:]
    weights += [1.0] * (len(ids) - position)
    source += range(position, len(ids))
    for i, (start, end) in enumerate(spans):
        out += [vocab.sentinel(i), *ids[start:end], vocab.eos_span]
        weights += [0.0] + [1.0] * (end - start) + [1.0]
        source += [-1, *range(start, end), -1]
    return MaskedDocument(ids=out, loss_weights=weights, spans=spans, source=source)


def cm3_unmask(ids: Sequence[int], vocab: Vocab) -> list[int]:
    """Invert :func:`cm3_mask_spans`: put each appended span back in place of its sentinel.

    Raises ``ValueError`` when ``ids`` is not a well-formed CM3 document.
    """
    ids = [int(t) for t in ids]
    sentinels = {vocab.sentinel(i): i for i in range(vocab.num_sentinels)}
    in_body = [j for j, t in enumerate(ids) if t in sentinels]
    if not in_body:
        if vocab.eos_span in ids:
            raise ValueError("CM3 document has <eos_span> but no sentinel tokens")
        return ids
    # Sentinels 0..n-1 appear once in the body and once more opening their appended span.
    if len(in_body) % 2:
        raise ValueError(f"CM3 document has an odd number ({len(in_body)}) of sentinel tokens")
    n = len(in_body) // 2
    tail_start = in_body[n]
    body, tail = ids[:tail_start], ids[tail_start:]

    restored: dict[int, list[int]] = {}
    j = 0
    for i in range(n):
        if j >= len(tail) or tail[j] != vocab.sentinel(i):
            raise ValueError(f"CM3 document: expected <mask:{i}> to open appended span {i}")
        try:
            end = tail.index(vocab.eos_span, j + 1)
        except ValueError:
            raise ValueError(f"CM3 document: appended span {i} has no <eos_span>") from None
        restored[i] = tail[j + 1 : end]
        j = end + 1
    if j != len(tail):
        raise ValueError("CM3 document: tokens after the last appended span")

    out: list[int] = []
    expected = 0
    for token in body:
        if token in sentinels:
            if sentinels[token] != expected:
                raise ValueError(
                    f"CM3 document: body sentinel <mask:{sentinels[token]}> out of order "
                    f"(expected <mask:{expected}>)"
                )
            out += restored[expected]
            expected += 1
        else:
            out.append(token)
    return out


def _reject_cm3_tokens(ids: list[int], vocab: Vocab) -> None:
    cm3_tokens = {vocab.sentinel(i) for i in range(vocab.num_sentinels)} | {vocab.eos_span}
    if cm3_tokens.isdisjoint(ids):
        return
    for position, token in enumerate(ids):
        if token in cm3_tokens:
            raise ValueError(
                f"document already holds CM3 token {vocab.token_name(token)} at position "
                f"{position}; apply cm3_mask_spans to raw documents only"
            )
