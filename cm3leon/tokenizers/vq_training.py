"""Train, save, load and measure the VQ image tokenizer (DESIGN.md §5).

Training is a plain loop (STYLE.md §9): batches drawn from a seeded generator, AdamW with
linear warmup then cosine decay to 0 (:func:`cm3leon.schedules.warmup_cosine`), loss = MSE
reconstruction + ``commitment`` x commitment loss; the codebook itself moves by EMA inside the
quantizer. On CPU the same seed gives the same weights, hence byte-identical tokens downstream.

Checkpoints are model folders (:mod:`cm3leon.checkpoints`: safetensors weights and codebook
buffers + ``config.json`` with the :class:`~cm3leon.config.VQConfig`); the fingerprint travels
into the tokens artifact so a later stage can tell which tokenizer made it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cm3leon.checkpoints import load_model_folder, load_weights, save_model_folder
from cm3leon.config import ConfigError, VQConfig, VQTrainConfig, from_mapping
from cm3leon.data.masks import binarize_mask
from cm3leon.data.masks import mask_iou as single_mask_iou
from cm3leon.environment import numeric_environment
from cm3leon.schedules import warmup_cosine
from cm3leon.tokenizers.vq import VQModel, psnr, to_model_input, to_uint8

StepCallback = Callable[[int, dict[str, float]], None]


def train_vq(
    images: np.ndarray,
    model_config: VQConfig,
    train_config: VQTrainConfig,
    seed: int,
    on_log: StepCallback | None = None,
) -> VQModel:
    """Train a VQ tokenizer on ``(N, H, W, 3)`` uint8 images; ``on_log`` gets periodic metrics."""
    if len(images) == 0:
        raise ValueError("no training images for the VQ tokenizer")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = VQModel(model_config)
    data = torch.from_numpy(np.ascontiguousarray(images))
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, betas=(0.9, 0.99))
    model.train()
    usage = torch.zeros(model_config.codebook_size)
    progress = tqdm(range(train_config.steps), desc="train VQ", unit="step", mininterval=5)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(
                step, train_config.steps, train_config.warmup_steps, peak=train_config.lr
            )
        batch = to_model_input(
            data[torch.randint(0, len(data), (train_config.batch_size,), generator=generator)]
        )
        reconstruction, codes, commit = model(batch, generator)
        recon_loss = F.mse_loss(reconstruction, batch)
        loss = recon_loss + model_config.commitment * commit
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        usage += torch.bincount(codes.flatten(), minlength=model_config.codebook_size)
        if on_log is not None and (
            step % train_config.log_every == 0 or step == train_config.steps - 1
        ):
            on_log(
                step,
                {
                    "loss": loss.item(),
                    "reconstruction_mse": recon_loss.item(),
                    "commitment": commit.item(),
                    "codebook_usage": float((usage > 0).float().mean()),
                    "lr": optimizer.param_groups[0]["lr"],
                },
            )
            usage.zero_()
    model.eval()
    return model


@torch.no_grad()
def encode_images(
    model: VQModel, images: np.ndarray, batch_size: int, desc: str = "encode"
) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 -> codes ``(N, h*w)`` int64, in the tokenizer's token order
    (``tokenize.vq.token_order``: row-major by default)."""
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=5):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        chunks.append(model.to_sequence(model.encode(to_model_input(batch))))
    if not chunks:
        return np.zeros((0, 0), dtype=np.int64)
    return torch.cat(chunks).numpy()


@torch.no_grad()
def decode_codes(model: VQModel, codes: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Codes ``(N, h*w)`` in the tokenizer's token order -> ``(N, H, W, 3)`` uint8 images."""
    model.eval()
    out = []
    for start in range(0, len(codes), batch_size):
        grid = model.to_grid(torch.from_numpy(codes[start : start + batch_size]).long())
        out.append(to_uint8(model.decode(grid)))
    return torch.cat(out).numpy()


def codebook_statistics(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Share of the codebook used and the perplexity of the code distribution."""
    counts = np.bincount(codes.ravel(), minlength=codebook_size).astype(np.float64)
    probs = counts / max(counts.sum(), 1)
    entropy = -(probs[probs > 0] * np.log(probs[probs > 0])).sum()
    return {
        "codebook_usage_percent": 100.0 * float((counts > 0).mean()),
        "codebook_perplexity": float(np.exp(entropy)),
    }


def reconstruction_metrics(original: np.ndarray, reconstruction: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and MSE (on the 0..255 scale) between two uint8 batches."""
    a, b = torch.from_numpy(original), torch.from_numpy(reconstruction)
    return {
        "psnr_db": psnr(a, b),
        "mse": float((a.float() - b.float()).pow(2).mean()),
    }


def mask_iou(masks: np.ndarray, reconstructions: np.ndarray) -> float:
    """Mean IoU of ``(N, H, W)`` uint8 0/255 masks and their ``(N, H, W, 3)`` reconstructions.

    One pair at a time: :func:`cm3leon.data.masks.binarize_mask` on both, then
    :func:`cm3leon.data.masks.mask_iou` (1.0 for a pair where both are empty).
    """
    return float(
        np.mean(
            [
                single_mask_iou(binarize_mask(r), binarize_mask(m))
                for m, r in zip(masks, reconstructions, strict=True)
            ]
        )
    )


def save_vq(model: VQModel, folder: str | Path) -> str:
    """Write weights + config (see :mod:`cm3leon.checkpoints`) and the numeric environment it
    was trained in (:func:`~cm3leon.environment.numeric_environment`); returns the
    fingerprint."""
    meta = {"config": asdict(model.config), "environment": numeric_environment()}
    return save_model_folder(folder, model.state_dict(), meta)


def load_vq(folder: str | Path) -> tuple[VQModel, str]:
    """Rebuild a tokenizer saved by :func:`save_vq`; returns (model in eval mode, fingerprint)."""
    state, meta, fingerprint = load_model_folder(folder, "VQ tokenizer")
    try:
        config = from_mapping(VQConfig, meta["config"], "vq")
    except (ConfigError, KeyError) as err:
        raise ConfigError(f"{folder}: invalid VQ config: {err}") from None
    model = VQModel(config)
    load_weights(model, state, folder, "VQ tokenizer")
    return model.eval(), fingerprint
