"""Token selection and decoding strategies (DESIGN.md §9; Chameleon's ``token_selector.py``).

A :class:`Strategy` says how one sample turns the conditional and unconditional next-token
logits into a token, by chaining the processors of :mod:`cm3leon.decoding.processors` that its
row of :data:`~cm3leon.decoding_strategies.STRATEGIES` names, each built from the decoding
config (``Strategy.from_config``).

CD-K here contrasts the *guided* distribution with the unconditional one, so at CFG weight 1 it
is the paper's ``log p_cond - log p_uncond``; a higher weight sharpens the guided side first.
:class:`TokenSelector` draws with the Gumbel-max trick from a seeded ``torch.Generator``: the
same seed and scores give the same tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from cm3leon.config import DecodingConfig
from cm3leon.decoding.processors import PROCESSORS
from cm3leon.decoding_strategies import ARGMAX, SAMPLE_PLANS, STRATEGIES


@dataclass(frozen=True)
class Strategy:
    """A strategy name (:data:`~cm3leon.decoding_strategies.STRATEGIES`) with the decoding
    settings its processors read (CFG weight, temperature, top-p, CD-K alpha and k)."""

    name: str
    settings: DecodingConfig = field(default_factory=DecodingConfig)
    chain: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {self.name!r}; known: {list(STRATEGIES)}")
        processors = tuple(PROCESSORS[k].from_config(self.settings) for k in STRATEGIES[self.name])
        object.__setattr__(self, "chain", processors)

    @classmethod
    def from_config(cls, config: DecodingConfig, name: str | None = None, **overrides) -> Strategy:
        """Strategy ``name`` (default ``config.strategy``) with ``config``'s settings, some
        replaced by ``overrides`` (e.g. ``cfg_weight=3.0``)."""
        return cls(name or config.strategy, dataclasses.replace(config, **overrides))

    @classmethod
    def named(cls, name: str, **settings) -> Strategy:
        """Strategy ``name`` with the default decoding settings except ``settings``."""
        return cls(name, DecodingConfig(**settings))

    @property
    def argmax(self) -> bool:
        """Whether the selector takes the best-scoring token instead of sampling."""
        return self.name in ARGMAX

    @property
    def needs_unconditional(self) -> bool:
        return any(p.needs_unconditional for p in self.chain)

    def scores(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """Selection scores ``(B, V)`` from (already constrained) logits: the chain applied in
        order, the unconditional stream handed to the processors that contrast with it."""
        if not self.needs_unconditional:
            uncond = None  # CFG at weight 1 is the conditional stream itself
        elif uncond is None:
            raise ValueError(f"strategy {self} needs the unconditional stream")
        for processor in self.chain:
            cond = processor(cond, uncond) if processor.contrastive else processor(cond)
        return cond


def sample_plan(config: DecodingConfig, plan: str, samples: int, **overrides) -> list[Strategy]:
    """One :class:`Strategy` per sample, cycling through plan ``plan``'s strategies
    (:data:`~cm3leon.decoding_strategies.SAMPLE_PLANS`), with ``config``'s settings."""
    if plan not in SAMPLE_PLANS:
        raise ValueError(f"unknown sample plan {plan!r}; known: {list(SAMPLE_PLANS)}")
    names = SAMPLE_PLANS[plan]
    return [
        Strategy.from_config(config, names[s % len(names)], **overrides) for s in range(samples)
    ]


class TokenSelector:
    """Pick one token per row: argmax for ``greedy``, else a sample from ``softmax(scores)``."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, scores: torch.Tensor, greedy: torch.Tensor | bool = False) -> torch.Tensor:
        """``scores`` (B, V) -> tokens (B,); ``greedy`` per row or for all rows."""
        uniform = torch.rand(
            scores.shape, generator=self.generator, device=scores.device, dtype=torch.float64
        )
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))  # (B, V)
        sampled = (scores.double() + gumbel).argmax(-1)
        best = scores.argmax(-1)
        greedy = torch.as_tensor(greedy, device=scores.device)
        return torch.where(greedy, best, sampled)
