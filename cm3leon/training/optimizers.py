"""Muon for the transformer's hidden matrices, AdamW for the rest: one optimizer.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) replaces a hidden weight
matrix's update by the orthogonalized Nesterov momentum: a quintic Newton–Schulz iteration maps
the momentum ``M = U S V^T`` to about ``U V^T`` (singular values into roughly [0.7, 1.2]), so
every direction of the update moves at the same rate instead of the few the gradient is
dominated by. Embeddings, the output head and any vector stay on AdamW, as in the reference
``MuonWithAuxAdam`` (github.com/KellerJordan/Muon) and ``torch.optim.Muon``'s documentation.

Why not ``torch.optim.Muon`` itself: it runs the Newton–Schulz iteration in bfloat16, which a
CPU without native bf16 matmuls emulates. On the 2-core Xeon here that made a pretraining step
3.7× slower than AdamW's; with this module's float32 iteration a step costs 1.05–1.09× AdamW's
(interleaved A/B; README, Quality experiments). The update is otherwise the same: Nesterov
momentum 0.95, Keller Jordan's coefficients (3.4445, −4.7750, 2.0315), five steps, the learning
rate scaled by ``sqrt(max(1, rows / cols))`` and decoupled weight decay ``p *= 1 − lr · wd``.

The AdamW groups apply exactly ``torch.optim.AdamW``'s single-tensor update (bias-corrected
moments, ``eps`` added after the square root's correction, decoupled decay), so a run with no
Muon matrix matches ``torch.optim.AdamW`` (tested). The state is per parameter in
``self.state``, so ``state_dict`` / ``load_state_dict`` — what DeepSpeed's checkpoints hold —
need nothing special and a resumed run continues exactly.

Muon needs each matrix whole and in float32: DeepSpeed's ZeRO stages and its bf16 optimizer
flatten the parameters into 1-D buffers before the optimizer sees them
(:class:`~cm3leon.config.TrainConfig` refuses those combinations).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# Keller Jordan's quintic: the largest slope at 0 that still converges (Muon's reference code).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def orthogonalize(matrix: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """About ``U V^T`` of ``matrix = U S V^T`` (2-D), by the quintic Newton–Schulz iteration in
    float32: singular values land in roughly [0.7, 1.2], directions are kept."""
    if matrix.ndim != 2:
        raise ValueError(f"orthogonalize needs a matrix, got shape {tuple(matrix.shape)}")
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.float()
    x = x.T if tall else x  # (rows <= cols): the Gram matrices are the small side's
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(matrix.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked ``muon: True`` (2-D parameters only), AdamW on the others.

    Group keys: ``lr``, ``weight_decay``; Muon groups ``momentum``; AdamW groups ``betas``,
    ``eps``. A learning-rate scheduler scales every group's ``lr`` alike."""

    def __init__(self, groups: Iterable[dict], momentum: float = 0.95, eps: float = 1e-8):
        groups = [dict(g) for g in groups]
        for i, group in enumerate(groups):
            group.setdefault("muon", False)
            if group["muon"]:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(
                            f"param group {i}: Muon updates matrices only, got a parameter of "
                            f"shape {tuple(p.shape)}; put it in an AdamW group"
                        )
        defaults = {"momentum": momentum, "betas": (0.9, 0.999), "eps": eps, "weight_decay": 0.0}
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = self._muon if group["muon"] else self._adamw
            for p in group["params"]:
                if p.grad is not None:
                    update(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buffer, momentum, lr = state["momentum_buffer"], group["momentum"], group["lr"]
        buffer.lerp_(p.grad, 1 - momentum)
        nesterov = p.grad.lerp(buffer, momentum)
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(orthogonalize(nesterov), alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        # torch.optim.AdamW's single-tensor path, written out (amsgrad off, not maximizing)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        lr, grad = group["lr"], p.grad
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bias_correction1)
