"""Token selection and decoding strategies (DESIGN.md §9; Chameleon's ``token_selector.py``).

A :class:`Strategy` says how one sample turns the conditional and unconditional next-token
logits into a token, by composing the processors of :mod:`cm3leon.decoding.processors`:

- ``top_p``: CFG -> temperature -> top-p -> sample;
- ``cd_k``: CFG -> CD-K against the unconditional stream -> temperature -> sample from the head;
- ``greedy``: CFG -> argmax.

CD-K here contrasts the *guided* distribution with the unconditional one, so at CFG weight 1 it
is the paper's ``log p_cond - log p_uncond``; a higher weight sharpens the guided side first.
:class:`TokenSelector` draws with the Gumbel-max trick from a seeded ``torch.Generator``: the
same seed and scores give the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cm3leon.decoding.processors import (
    ClassifierFreeGuidance,
    ContrastiveDecodingK,
    Temperature,
    TopP,
)

STRATEGIES = ("top_p", "cd_k", "greedy")


@dataclass(frozen=True)
class Strategy:
    name: str = "top_p"
    cfg_weight: float = 1.0
    temperature: float = 1.0
    top_p: float = 0.9
    cd_alpha: float = 0.1
    cd_k: int = 5

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {self.name!r}; known: {STRATEGIES}")
        # Build once to validate every value with the processors' own checks.
        self.processors()

    @property
    def needs_unconditional(self) -> bool:
        return self.cfg_weight != 1.0 or self.name == "cd_k"

    def processors(self) -> tuple:
        return (
            ClassifierFreeGuidance(self.cfg_weight),
            ContrastiveDecodingK(self.cd_alpha, self.cd_k),
            Temperature(self.temperature),
            TopP(self.top_p),
        )

    def scores(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """Selection scores ``(B, V)`` from (already constrained) logits."""
        cfg, cd_k, temperature, top_p = self.processors()
        if self.needs_unconditional:
            if uncond is None:
                raise ValueError(f"strategy {self} needs the unconditional stream")
            guided = cfg(cond, uncond)
        else:
            guided = cond
        if self.name == "greedy":
            return guided
        if self.name == "cd_k":
            return temperature(cd_k(guided, uncond))
        return top_p(temperature(guided))


def sample_plan(name: str, samples: int, **settings) -> list[Strategy]:
    """One :class:`Strategy` per sample; ``mix`` alternates top-p and CD-K (CM3Leon §3)."""
    names = ["top_p", "cd_k"] * samples if name == "mix" else [name] * samples
    return [Strategy(n, **settings) for n in names[:samples]]


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
