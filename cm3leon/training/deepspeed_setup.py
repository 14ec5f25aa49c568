"""DeepSpeed on every machine: the one function that builds its config, and process setup.

Training always goes through a real DeepSpeed engine (DESIGN.md §7): on CPU with the gloo
backend and fp32, on GPUs with NCCL and bf16. Single-process runs need no launcher — the
rendezvous variables are filled in for a world of one — while ``torchrun --nproc_per_node N``
and the ``deepspeed`` launcher (multi-node with a hostfile) set them themselves.
"""

from __future__ import annotations

import os
import socket
from typing import Any, NamedTuple

import torch

from cm3leon.config import TrainConfig


def deepspeed_config(config: TrainConfig, world_size: int, use_bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (optimizer and schedule are passed as objects)."""
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.micro_batch_size
        * config.gradient_accumulation_steps
        * world_size,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW: works on CPU and GPU alike
        "bf16": {"enabled": use_bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log ourselves (dvclive on rank 0)
        "wall_clock_breakdown": False,
    }


def use_bf16(config: TrainConfig) -> bool:
    """bf16 (DeepSpeed's bf16 optimizer) or fp32. ``auto``: bf16 on a GPU, except with
    ``optimizer: muon``, which needs each matrix whole (the bf16 optimizer flattens them)."""
    if config.precision == "auto":
        return torch.cuda.is_available() and config.optimizer != "muon"
    if config.precision == "bf16" and not torch.cuda.is_available():
        raise ValueError("train.precision: bf16 needs a GPU here; use fp32 or auto on CPU")
    return config.precision == "bf16"


class Process(NamedTuple):
    """Where this training process runs: its rank, the world size, its device."""

    rank: int
    world: int
    device: torch.device


def init_distributed() -> Process:
    """Start (or join) the process group; returns this process's ``(rank, world, device)``."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain `python stage.py`: a world of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
    return Process(rank, world, device)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
