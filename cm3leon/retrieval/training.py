"""Contrastive training of the dual encoder (CLIP's symmetric InfoNCE, Radford et al. 2021).

Each step draws a batch of train documents from a seeded generator and, for each, one of its
caption paraphrases; image->text and text->image cross-entropies over the batch's cosine
similarities (scaled by a learnable temperature, clamped at 100) are averaged. Documents whose
caption sets are identical (the same scene drawn twice) count as positives of each other, so
the loss never pushes apart true matches. AdamW, linear warmup, cosine decay to 0
(:func:`cm3leon.schedules.warmup_cosine`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cm3leon.config import RetrieverConfig, RetrieverTrainConfig
from cm3leon.retrieval.dual_encoder import MAX_LOGIT_SCALE, DualEncoder, image_input, pad_text
from cm3leon.schedules import warmup_cosine


def contrastive_loss(
    text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over unit vectors ``(B, D)``; equal ``groups`` ids are positives."""
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * text @ image.t()  # (B, B)
    positives = (groups[:, None] == groups[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def train_dual_encoder(
    paraphrases: Sequence[Sequence[Sequence[int]]],
    images: np.ndarray,
    model_config: RetrieverConfig,
    train_config: RetrieverTrainConfig,
    text_vocab_size: int,
    seed: int,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> DualEncoder:
    """Train on documents given as paraphrase lists (BPE-local ids) and ``(N, H, W, 3)`` images."""
    if len(paraphrases) != len(images) or len(images) < 2:
        raise ValueError(f"need >= 2 paired documents, got {len(paraphrases)} / {len(images)}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DualEncoder(model_config, text_vocab_size, images.shape[1])
    keys = {}
    groups = torch.tensor([keys.setdefault(_caption_key(p), len(keys)) for p in paraphrases])
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=0.01)
    batch_size = min(train_config.batch_size, len(images))
    model.train()
    for step in tqdm(range(train_config.steps), desc="train retriever", unit="step", mininterval=5):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(
                step, train_config.steps, train_config.warmup_steps, peak=train_config.lr
            )
        index = torch.randperm(len(images), generator=generator)[:batch_size]
        choice = torch.randint(0, 1 << 30, (batch_size,), generator=generator)
        texts = [
            paraphrases[i][c % len(paraphrases[i])]
            for i, c in zip(index.tolist(), choice.tolist(), strict=True)
        ]
        text = model.encode_text(pad_text(texts, model_config.max_text_tokens))
        image = model.encode_image(image_input(images[index.numpy()]))
        loss = contrastive_loss(text, image, model.logit_scale, groups[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_log is not None and (
            step % train_config.log_every == 0 or step == train_config.steps - 1
        ):
            with torch.no_grad():
                accuracy = (text @ image.t()).argmax(1).eq(torch.arange(batch_size)).float().mean()
            on_log(
                step,
                {
                    "loss": loss.item(),
                    "batch_text_to_image_top1": accuracy.item(),
                    "temperature": 1 / model.similarity_scale,
                    "lr": optimizer.param_groups[0]["lr"],
                },
            )
    return model.eval()


def _caption_key(paraphrases: Sequence[Sequence[int]]) -> tuple:
    return tuple(sorted(tuple(p) for p in paraphrases))
