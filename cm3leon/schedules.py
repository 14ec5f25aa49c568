"""Learning-rate schedule shared by every training loop: linear warmup, then cosine decay.

The VQ tokenizer (:mod:`cm3leon.tokenizers.vq_training`), the dual-encoder retriever
(:mod:`cm3leon.retrieval.training`) and the CM3 pretraining/SFT loop
(:mod:`cm3leon.training.loop`) all use :func:`warmup_cosine`. It lives at the package root,
next to :mod:`cm3leon.config`, so each of those layers can import it without importing another.
The cosine half is SGDR's annealing without restarts (Loshchilov & Hutter 2017, "SGDR:
Stochastic Gradient Descent with Warm Restarts"), the shape of nanoGPT's ``get_lr``.
"""

from __future__ import annotations

import math


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0, peak: float = 1.0
) -> float:
    """Value at ``step`` (0-based) of a schedule rising linearly to ``peak``, then cosine-decaying.

    - ``step < warmup_steps``: ``peak * (step + 1) / warmup_steps``, so the first step already
      trains (``peak / warmup_steps``) and step ``warmup_steps - 1`` reaches ``peak``;
    - afterwards ``peak * (min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2)`` with
      ``progress = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped at 1, so the
      schedule ends at (and past ``total_steps`` stays at) ``peak * min_ratio``.

    With ``peak=1.0`` this is a multiplier of a base learning rate (``LambdaLR``); loops that set
    ``param_group["lr"]`` themselves pass their learning rate as ``peak``. The order of the
    operations is part of the contract: changing it changes the last bit of some learning rates,
    hence the trained weights and every artifact downstream.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (min_ratio + (1 - min_ratio) * cosine)
