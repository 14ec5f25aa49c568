"""Logit processors: small pure functions of next-token scores (DESIGN.md §9; STYLE.md §8).

Each processor maps scores ``(B, V)`` to scores ``(B, V)`` and knows nothing of the model, the
cache or the other processors; :mod:`cm3leon.decoding.generation` composes them and a
:class:`~cm3leon.decoding.selector.TokenSelector` picks the token. ``-inf`` marks a token that
may not be chosen.

- :class:`ClassifierFreeGuidance` (Ho & Salimans 2022; CM3Leon §3.1): with conditional and
  unconditional logits, ``uncond + w * (cond - uncond)``; ``w = 1`` is the conditional stream.
- :class:`ContrastiveDecodingK` (CM3Leon §3.2, "CD-K"; Li et al. 2022): over the head
  ``{x : p_cond(x) >= alpha * kth_largest(p_cond)}`` the score is
  ``log p_cond(x) - log p_uncond(x)``, every other token is ``-inf``. CM3Leon's change to
  contrastive decoding is the k-th largest probability instead of the maximum, so the head
  always holds at least ``k`` tokens.
- :class:`Temperature` and :class:`TopP` (nucleus sampling, Holtzman et al. 2020): the minimal
  set of most likely tokens whose probability reaches ``p``.
Each sampling processor is built from the decoding config by ``from_config`` and registered in
:data:`PROCESSORS` under the key that :mod:`cm3leon.decoding_strategies` chains; ``contrastive``
says whether it takes the unconditional stream as a second argument.

- :class:`ModalityConstraint`: which tokens are legal at each step — only image ids inside an
  image span, exactly ``image_tokens`` of them, then none (back to text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cm3leon.config import DecodingConfig
from cm3leon.tokenizers.vocab import Vocab

NEG_INF = float("-inf")


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    weight: float
    contrastive = True  # takes the unconditional stream (a class attribute, not a field)

    @classmethod
    def from_config(cls, config: DecodingConfig) -> ClassifierFreeGuidance:
        return cls(config.cfg_weight)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"CFG weight must be >= 0, got {self.weight}")

    @property
    def needs_unconditional(self) -> bool:
        return self.weight != 1.0

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        if uncond is None:  # no unconditional stream: nothing to guide against
            return cond
        # uncond + w (cond - uncond), written so that w = 1 returns cond bit for bit; masked
        # tokens (-inf in both streams) stay -inf instead of becoming nan.
        guided = cond + (self.weight - 1.0) * (cond - uncond)
        return torch.where(torch.isneginf(cond), cond, guided)


@dataclass(frozen=True)
class ContrastiveDecodingK:
    alpha: float
    k: int
    contrastive = True
    needs_unconditional = True

    @classmethod
    def from_config(cls, config: DecodingConfig) -> ContrastiveDecodingK:
        return cls(config.cd_alpha, config.cd_k)

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"CD-K alpha must be in [0, 1], got {self.alpha}")
        if self.k < 1:
            raise ValueError(f"CD-K k must be >= 1, got {self.k}")

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        log_cond = torch.log_softmax(cond.float(), dim=-1)  # (B, V)
        log_uncond = torch.log_softmax(uncond.float(), dim=-1)
        k = min(self.k, cond.shape[-1])
        # The head on the raw logits: p(x) >= alpha p_k  <=>  cond(x) >= cond_k + log(alpha),
        # the normalizer cancels. On log-probabilities, rounding x - logsumexp would merge
        # logits closer than its spacing into ties and widen the head (HF top-k parity tests).
        logits = cond.float()
        kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        head = logits >= kth + math.log(self.alpha) if self.alpha > 0 else None
        score = log_cond - torch.where(torch.isneginf(log_uncond), 0.0, log_uncond)
        if head is not None:
            score = score.masked_fill(~head, NEG_INF)
        return score.masked_fill(torch.isneginf(log_cond), NEG_INF)


@dataclass(frozen=True)
class Temperature:
    value: float
    contrastive = False
    needs_unconditional = False

    @classmethod
    def from_config(cls, config: DecodingConfig) -> Temperature:
        return cls(config.temperature)

    def __post_init__(self) -> None:
        if self.value <= 0:
            raise ValueError(f"temperature must be > 0, got {self.value}")

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.value


@dataclass(frozen=True)
class TopP:
    p: float
    contrastive = False
    needs_unconditional = False

    @classmethod
    def from_config(cls, config: DecodingConfig) -> TopP:
        return cls(config.top_p)

    def __post_init__(self) -> None:
        if not 0 < self.p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.p}")

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.p >= 1:
            return scores
        sorted_scores, order = scores.sort(dim=-1, descending=True)  # (B, V)
        # float64: with float32 sums the mass before a tail token carries ~1e-7 of rounding,
        # which decides ties with p near 1 (HF parity tests compare against exact sums).
        probs = torch.softmax(sorted_scores.double(), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= self.p  # the minimal set reaching p keeps its last token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return scores.masked_fill(drop, NEG_INF)


# The processor keys that cm3leon.decoding_strategies chains, each built from the decoding
# config (``evaluate.decoding``) by its ``from_config``.
PROCESSORS = {
    "cfg": ClassifierFreeGuidance,
    "cd_k": ContrastiveDecodingK,
    "temperature": Temperature,
    "top_p": TopP,
}


class ModalityConstraint:
    """Legal next tokens for one generated segment, per row.

    ``output`` names what the segment must be:

    - ``"image"``: exactly ``length`` image ids (default ``image_tokens``, the grid's count;
      fewer when infilling a masked image region), then only a stop token;
    - ``"text"``: text ids or a stop token, never an image id;
    - ``"any"``: free, but an image span once begun holds only image ids until it has
      ``image_tokens`` of them, after which image ids are banned until a non-image token.

    ``stops`` are the tokens that end the segment (e.g. ``<eos>``, ``<eos_span>``).
    """

    def __init__(
        self,
        vocab: Vocab,
        image_tokens: int,
        output: str,
        stops: tuple[int, ...],
        length: int | None = None,
    ) -> None:
        if output not in ("image", "text", "any"):
            raise ValueError(f"output must be image, text or any; got {output!r}")
        if not stops:
            raise ValueError("a segment needs at least one stop token")
        self.image_tokens, self.output = image_tokens, output
        self.length = image_tokens if length is None else length
        self.image = torch.zeros(vocab.size, dtype=torch.bool)
        self.image[vocab.image_offset : vocab.size] = True
        self.text = torch.zeros(vocab.size, dtype=torch.bool)
        self.text[vocab.text_offset : vocab.image_offset] = True
        self.stop = torch.zeros(vocab.size, dtype=torch.bool)
        self.stop[list(stops)] = True

    def to(self, device: torch.device | str) -> ModalityConstraint:
        """This constraint with its masks on ``device`` (where the logits are)."""
        for name in ("image", "text", "stop"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def allowed(self, run: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` legal tokens, given each row's trailing image-run length ``run`` (B,)
        (prompt tokens included) and how many tokens it has generated so far ``generated``."""
        B = run.shape[0]
        if self.output == "image":
            return torch.where(
                (generated < self.length)[:, None], self.image[None], self.stop[None]
            )
        if self.output == "text":
            return (self.text | self.stop)[None].expand(B, -1)
        inside = ((run > 0) & (run < self.image_tokens))[:, None]  # (B, 1) unfinished span
        full = (run >= self.image_tokens)[:, None]  # (B, 1) a complete image just ended
        free = torch.ones_like(self.image)[None] & ~(full & self.image[None])
        return torch.where(inside, self.image[None].expand(B, -1), free)

    def __call__(
        self, scores: torch.Tensor, run: torch.Tensor, generated: torch.Tensor
    ) -> torch.Tensor:
        return scores.masked_fill(~self.allowed(run, generated).to(scores.device), NEG_INF)


def image_run_lengths(ids: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Length of the trailing run of image ids in each row of ``ids`` (B, T) -> (B,)."""
    not_image = (~vocab.image_mask(ids)).flip(-1)  # (B, T), last token first
    run = not_image.long().argmax(-1)  # first non-image token from the end
    return torch.where(not_image.any(-1), run, torch.full_like(run, ids.shape[1]))
