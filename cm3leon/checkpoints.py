"""Model folders: ``model.safetensors`` + ``config.json`` with a content fingerprint.

Every model artifact (VQ tokenizer, retriever, transformer) is a folder holding its weights as
safetensors — tensors only, no pickled code (DESIGN.md §12) — and a ``config.json`` with what is
needed to rebuild the model (STYLE.md §6) plus a fingerprint: a hash of that metadata and the
weight bytes. Downstream artifacts record the fingerprint of the model that made them, and
loading recomputes it, so an edited or mismatched folder is caught by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cm3leon.artifacts import atomic_write_bytes, atomic_write_json

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_model_folder(folder: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> str:
    """Write weights and metadata atomically; returns the fingerprint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(tmp))
    weights = tmp.read_bytes()
    tmp.unlink()
    atomic_write_bytes(folder / WEIGHTS_FILE, weights)
    fingerprint = _fingerprint(meta, weights)
    atomic_write_json(folder / CONFIG_FILE, {**meta, "fingerprint": fingerprint})
    return fingerprint


def load_model_folder(
    folder: str | Path, kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Read ``(state_dict, meta, fingerprint)``; ``kind`` names the model in error messages."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {folder} is not a {kind} folder")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not a readable {kind} config ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(
            f"{config_path}: a {kind} config is a JSON object, not {type(meta).__name__}"
        )
    stored = meta.pop("fingerprint", None)
    weights = weights_path.read_bytes()
    fingerprint = _fingerprint(meta, weights)
    if stored != fingerprint:
        raise ValueError(
            f"{folder}: {kind} weights or config changed since they were saved "
            f"(fingerprint {stored} != {fingerprint})"
        )
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{weights_path}: not readable {kind} weights ({err})") from None
    return state, meta, fingerprint


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], folder, kind: str):
    """``model.load_state_dict(state)``, with a mismatch (a config that does not describe these
    weights: other shapes, missing or extra tensors) reported as a ``ValueError`` naming the
    folder instead of torch's traceback."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ValueError(
            f"{folder}: the {kind} weights do not fit the model its config.json describes "
            f"({detail})"
        ) from None
    return model


def _fingerprint(meta: dict, weights: bytes) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    digest.update(weights)
    return digest.hexdigest()[:16]
