"""CLIP-style dual encoder: the retriever, re-ranker and feature extractor (DESIGN.md §6).

CM3Leon retrieves memory-bank documents with a dense bi-encoder (a frozen CLIP in the paper,
Yu et al. 2023 §2.2); here a small one is trained on the corpus. A text encoder (bidirectional
transformer over BPE tokens, mean-pooled) and an image encoder (CNN over pixels, flattened so
the position of objects survives) project into one L2-normalized space. A document's
embedding is the normalized mean of its normalized text and image embeddings.

The same model later re-ranks samples (CLIP-style), scores CLIP score, and gives the image
features for feature-space FID — hence ``embed_text``, ``embed_image`` and ``embed_document``.
Saved as a model folder (:mod:`cm3leon.checkpoints`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cm3leon.checkpoints import load_model_folder, load_weights, save_model_folder
from cm3leon.config import ConfigError, RetrieverConfig, from_mapping
from cm3leon.environment import numeric_environment


class TextEncoder(nn.Module):
    """BPE ids ``(B, T)`` (``-1`` = padding) -> ``(B, embed_dim)``."""

    def __init__(self, config: RetrieverConfig, text_vocab_size: int) -> None:
        super().__init__()
        self.max_tokens = config.max_text_tokens
        self.token = nn.Embedding(text_vocab_size + 1, config.text_width)  # row 0 = padding
        self.position = nn.Parameter(torch.zeros(config.max_text_tokens, config.text_width))
        layer = nn.TransformerEncoderLayer(
            config.text_width,
            config.text_heads,
            dim_feedforward=4 * config.text_width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.text_width)
        self.project = nn.Linear(config.text_width, config.embed_dim)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.max_tokens]
        valid = ids >= 0  # (B, T)
        x = self.token(ids.clamp(min=-1) + 1) + self.position[: ids.shape[1]]  # (B, T, W)
        x = self.norm(self.blocks(x, src_key_padding_mask=~valid))
        pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        return self.project(pooled)


class ImageEncoder(nn.Module):
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, embed_dim)``."""

    def __init__(self, config: RetrieverConfig, image_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch in config.image_channels:
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1),
                nn.GroupNorm(8, out_ch),
                nn.SiLU(),
                nn.Conv2d(out_ch, out_ch, 3, padding=1),
                nn.GroupNorm(8, out_ch),
                nn.SiLU(),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(config.image_channels)
        self.project = nn.Linear(in_ch * side * side, config.embed_dim)  # keeps where things are

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images).flatten(1))


MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the learned similarity scale


class DualEncoder(nn.Module):
    def __init__(self, config: RetrieverConfig, text_vocab_size: int, image_size: int) -> None:
        super().__init__()
        self.config = config
        self.text_vocab_size = text_vocab_size
        self.image_size = image_size
        self.text = TextEncoder(config, text_vocab_size)
        self.image = ImageEncoder(config, image_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init

    @property
    def similarity_scale(self) -> float:
        """The learned scale of cosine similarities (1 / temperature, clamped at 100): its
        product with a cosine is the logit the contrastive loss trained, i.e.
        ``log p(image | text)`` up to a constant per text."""
        return float(self.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp())

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    # --- numpy-facing API used by indexing, re-ranking and evaluation ---------------------------
    @torch.no_grad()
    def embed_text(self, texts: Sequence[Sequence[int]], batch_size: int = 512) -> np.ndarray:
        """BPE-local id lists -> ``(N, D)`` float32 unit vectors."""
        self.eval()
        out = [
            self.encode_text(pad_text(texts[i : i + batch_size], self.config.max_text_tokens))
            for i in range(0, len(texts), batch_size)
        ]
        return _stack(out, self.config.embed_dim)

    @torch.no_grad()
    def embed_image(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 -> ``(N, D)`` float32 unit vectors."""
        self.eval()
        self._check_images(images)
        out = [
            self.encode_image(image_input(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return _stack(out, self.config.embed_dim)

    def embed_document(
        self, texts: Sequence[Sequence[int]], images: np.ndarray, batch_size: int = 512
    ) -> np.ndarray:
        """Normalized mean of the normalized text and image embeddings."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        return combine(self.embed_text(texts, batch_size), self.embed_image(images, batch_size))

    def _check_images(self, images: np.ndarray) -> None:
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"retriever expects (N, {expected}) uint8 images, got {images.shape}")


def combine(text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Unit-normalized mean of two ``(N, D)`` batches of unit vectors."""
    mean = (text + image) / 2
    norm = np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return (mean / norm).astype(np.float32)


def pad_text(texts: Sequence[Sequence[int]], max_tokens: int) -> torch.Tensor:
    """Lists of BPE-local ids -> ``(B, T)`` long tensor, ``-1`` padded, cut at ``max_tokens``."""
    length = max(1, min(max_tokens, max((len(t) for t in texts), default=1)))
    out = torch.full((len(texts), length), -1, dtype=torch.long)
    for i, ids in enumerate(texts):
        ids = list(ids)[:length]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def image_input(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _stack(chunks: list[torch.Tensor], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)


def save_dual_encoder(model: DualEncoder, folder: str | Path) -> str:
    meta = {
        "config": asdict(model.config),
        "text_vocab_size": model.text_vocab_size,
        "image_size": model.image_size,
        "environment": numeric_environment(),  # what shaped its numbers (cm3leon.numerics)
    }
    return save_model_folder(folder, model.state_dict(), meta)


def load_dual_encoder(folder: str | Path) -> tuple[DualEncoder, str]:
    state, meta, fingerprint = load_model_folder(folder, "retriever")
    try:
        config = from_mapping(RetrieverConfig, meta["config"], "encoder")
        model = DualEncoder(config, meta["text_vocab_size"], meta["image_size"])
    except (ConfigError, KeyError) as err:
        raise ConfigError(f"{folder}: invalid retriever config: {err}") from None
    load_weights(model, state, folder, "retriever")
    return model.eval(), fingerprint
