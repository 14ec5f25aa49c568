"""Exported transformer folders: write one, rebuild a model from one (DESIGN.md §3, §12).

A model folder (``models/pretrain``, ``models/sft``) is safetensors weights plus ``config.json``
holding the transformer shape, the Vocab layout and the caller's metadata, and ``vocab.json``
(:mod:`cm3leon.checkpoints`). Training writes it; inference, SFT and the CLI read it — the
one place that knows both directions, so inference needs nothing of the training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cm3leon.artifacts import atomic_dir
from cm3leon.checkpoints import load_model_folder, load_weights, save_model_folder
from cm3leon.model.transformer import DecoderLM, TransformerShape
from cm3leon.tokenizers.vocab import Vocab


def export_model(
    state: dict[str, torch.Tensor],
    shape: TransformerShape,
    vocab: Vocab,
    out_dir: str | Path,
    extra: dict[str, Any],
) -> str:
    """Write the model folder atomically; returns its fingerprint."""
    with atomic_dir(out_dir) as tmp:
        fingerprint = save_model_folder(
            tmp, state, {"shape": shape.to_dict(), "vocab": vocab.to_dict(), **extra}
        )
        vocab.save(tmp)
    return fingerprint


def load_decoder(folder: str | Path) -> tuple[DecoderLM, Vocab, dict[str, Any], str]:
    """Rebuild an exported model: ``(model in eval mode, vocab, metadata, fingerprint)``."""
    state, meta, fingerprint = load_model_folder(folder, "transformer")
    vocab = Vocab.load(folder)
    try:
        shape = TransformerShape.from_dict(meta["shape"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder}/config.json: no valid transformer shape ({err!r})") from None
    model = DecoderLM(shape)
    load_weights(model, state, folder, "transformer")
    return model.eval(), vocab, meta, fingerprint
