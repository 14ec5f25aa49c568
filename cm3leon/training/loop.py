"""The training loop, written out (STYLE.md §9): setup -> train -> checkpoint -> export.

Used by pretraining and SFT alike; what differs between them is only which batches
``batch_for`` returns and which validation sets are scored. The loop:

- wraps the model in a DeepSpeed engine (:mod:`cm3leon.training.deepspeed_setup`) with AdamW
  (weight decay on matrices only), linear warmup then cosine decay to ``min_lr_ratio``;
- resumes from the newest DeepSpeed checkpoint in ``checkpoint_dir`` — the batches of a step are
  a pure function of the step number, so a resumed run continues exactly where it stopped;
- computes the weighted next-token loss (per-token weights come with each batch);
- logs train loss, learning rate, tokens/s and tokens seen (kept in the checkpoint) every
  ``log_every`` steps, and validation loss and perplexity — on text tokens, image tokens and
  the query documents — every ``eval_every`` steps and at the end, through a callback that
  runs on rank 0 only.

Checkpoints in ``checkpoint_dir`` are DeepSpeed's own (model + optimizer + scheduler state);
the tracked artifact is the exported model folder written by the caller.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cm3leon.config import TrainConfig
from cm3leon.schedules import warmup_cosine
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.training.deepspeed_setup import Process, deepspeed_config, use_bf16
from cm3leon.training.sequences import Batch

LogCallback = Callable[[int, dict[str, float]], None]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` at ``step``: :func:`~cm3leon.schedules.warmup_cosine`."""
    return warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)


def weighted_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy averaged with the batch's per-token weights."""
    losses = F.cross_entropy(
        logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none"
    )
    weights = batch.weights.flatten().to(losses.device)
    return (losses * weights).sum() / weights.sum().clamp(min=1e-8)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))


def train(
    model: nn.Module,
    batch_for: Callable[[int, int, int, int], Batch],
    validation: dict[str, Sequence[Batch]],
    vocab: Vocab,
    config: TrainConfig,
    checkpoint_dir: str | Path,
    process: Process,
    on_log: LogCallback | None = None,
) -> nn.Module:
    """Train ``model``; ``batch_for(step, micro_step, rank, world)`` gives each micro-batch.

    ``validation`` maps a name to fixed batches scored with :func:`evaluate`. Returns the
    trained module (unwrapped from the engine).
    """
    import deepspeed

    rank, world, device = process

    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, world, use_bf16(config)),
    )
    checkpoint_dir = Path(checkpoint_dir)
    start, seen = 0, 0  # seen: weighted training targets so far, all ranks (compute spent)
    if (checkpoint_dir / "latest").is_file():
        _, client_state = engine.load_checkpoint(str(checkpoint_dir))
        start, seen = int(client_state["step"]), int(client_state.get("tokens_seen", 0))
        _log(on_log, rank, start, {"resumed_from_step": float(start)})
    if start >= config.steps:  # finished before: report the final validation again
        for name, batches in validation.items():
            metrics = evaluate(engine, batches, vocab, device)
            _log(on_log, rank, start, {f"{name}/{k}": v for k, v in metrics.items()})
    tokens, window_start = 0, time.perf_counter()
    for step in range(start, config.steps):
        engine.train()
        losses = []
        for micro in range(config.gradient_accumulation_steps):
            batch = _to(batch_for(step, micro, rank, world), device)
            loss = weighted_loss(engine(batch.inputs, cells=batch.cells), batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            tokens += batch.tokens * world
            seen += batch.tokens * world
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            elapsed = time.perf_counter() - window_start
            _log(
                on_log,
                rank,
                done,
                {
                    "train/loss": _mean_over_ranks(sum(losses) / len(losses), world, device),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/tokens_per_second": tokens / max(elapsed, 1e-9),
                    "train/tokens_seen": float(seen),
                },
            )
            tokens, window_start = 0, time.perf_counter()
        if done % config.eval_every == 0 or done == config.steps:
            for name, batches in validation.items():
                metrics = evaluate(engine, batches, vocab, device)
                _log(on_log, rank, done, {f"{name}/{k}": v for k, v in metrics.items()})
        if done % config.checkpoint_every == 0 or done == config.steps:
            engine.save_checkpoint(
                str(checkpoint_dir),
                tag=f"step{done}",
                client_state={"step": done, "tokens_seen": seen},
            )
    return engine.module


def full_state_dict(model: nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every weight whole, fp32, on CPU. Under ZeRO-3 each rank holds only a shard of each
    parameter, so they are gathered first — a collective: call it on every rank."""
    import deepspeed

    gathered = list(model.parameters()) if zero_stage == 3 else []
    with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None, enabled=bool(gathered)):
        return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], vocab: Vocab, device) -> dict[str, float]:
    """Weighted loss and perplexity overall, on text targets, image targets, query documents."""
    model.eval()
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in ("all", "text", "image", "query")}
    for batch in batches:
        batch = _to(batch, device)
        logits = model(batch.inputs, cells=batch.cells)
        losses = F.cross_entropy(
            logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none"
        )
        weights = batch.weights.flatten()
        groups = {
            "all": torch.ones_like(weights, dtype=torch.bool),
            "text": vocab.text_mask(batch.targets).flatten(),
            "image": vocab.image_mask(batch.targets).flatten(),
            "query": batch.query.flatten(),
        }
        for name, keep in groups.items():
            w = weights * keep
            sums[name] += torch.stack([(losses * w).sum(), w.sum()]).double().cpu()
    out = {}
    for name, (total, count) in sums.items():
        loss = float(total / count) if count > 0 else float("nan")
        prefix = "loss" if name == "all" else f"{name}_loss"
        out[prefix] = loss
        out[prefix.replace("loss", "perplexity")] = math.exp(min(loss, 50.0))
    return out


def _to(batch: Batch, device: torch.device) -> Batch:
    cells = None if batch.cells is None else batch.cells.to(device)
    moved = (t.to(device) for t in (batch.inputs, batch.targets, batch.weights, batch.query))
    return Batch(*moved, cells)


def _mean_over_ranks(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item() / world)


def _log(on_log: LogCallback | None, rank: int, step: int, metrics: dict[str, float]) -> None:
    if on_log is not None and rank == 0:
        on_log(step, metrics)
