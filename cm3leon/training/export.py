"""The end of every training run: gather the trained weights and write the model folder.

Shared by pretraining and SFT. Under ZeRO-3 each rank holds a shard of every parameter, so the
gather is a collective that every rank calls; rank 0 alone writes
(:func:`cm3leon.model.io.export_model`), and the others wait for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cm3leon.environment import numeric_environment
from cm3leon.model.io import export_model
from cm3leon.model.transformer import TransformerShape
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.training.deepspeed_setup import Process
from cm3leon.training.loop import full_state_dict


def export_trained(
    model: nn.Module,
    zero_stage: int,
    shape: TransformerShape,
    vocab: Vocab,
    out_dir: str | Path,
    meta: dict[str, Any],
    process: Process,
) -> None:
    """Write ``model`` (as trained under ``zero_stage``) to ``out_dir``. Call on every rank.
    ``config.json`` also records the run's numeric environment (``environment``)."""
    state = full_state_dict(model, zero_stage)
    if process.rank == 0:
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        environment = numeric_environment(process.device, process.world, bf16)
        export_model(state, shape, vocab, out_dir, {**meta, "environment": environment})
    if process.world > 1:
        dist.barrier()
