"""The training loop, written out (STYLE.md §9): setup -> train -> checkpoint -> export.

Used by pretraining and SFT alike; what differs between them is only which batches
``batch_for`` returns and which validation sets are scored. The loop:

- wraps the model in a DeepSpeed engine (:mod:`cm3leon.training.deepspeed_setup`) with AdamW
  (weight decay on matrices only) or Muon on the hidden matrices (``optimizer: muon``,
  :mod:`cm3leon.training.optimizers`), linear warmup then cosine decay to ``min_lr_ratio``;
- resumes from the newest DeepSpeed checkpoint in ``checkpoint_dir`` — the batches of a step are
  a pure function of the step number, so a resumed run continues exactly where it stopped;
- computes the weighted next-token loss (per-token weights come with each batch) on the
  targets alone (:func:`training_loss`: padding costs no matmul);
- logs train loss, learning rate, tokens/s, tokens seen (kept in the checkpoint), the useful
  share of the padded batch slots (weighted targets over slots; padding costs attention only)
  and the useful-token MFU (the model FLOPs of the weighted targets per second over the matmul
  peak that :func:`~cm3leon.training.throughput.matmul_peak_flops` measures once at the start,
  in the training dtype) every ``log_every`` steps, over the steps since the last log; once at
  the end the same two over the whole run (``train/run_tokens_per_second``,
  ``train/run_mfu``: evaluation, logging and checkpoints count against those); validation
  loss and perplexity — on text tokens, image tokens and the query documents — every
  ``eval_every`` steps and at the end, through a callback that runs on rank 0 only;
- shows progress on stderr (rank 0): a tqdm bar (step/total, rate, ETA, loss, tokens/s) when
  stderr is a terminal, and in any case one plain line per evaluation — step/total, train and
  val loss, tokens/s, elapsed and ETA — and one when a run resumes, so ``dvc repro`` and Prefect
  logs show where a run is.

Checkpoints in ``checkpoint_dir`` are DeepSpeed's own (model + optimizer + scheduler state);
the newest two are kept. A torn ``latest`` pointer or a half-written newest checkpoint (a kill
during a save) makes the run resume from the next older readable one. The tracked artifact is
the exported model folder written by the caller.
"""

from __future__ import annotations

import math
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cm3leon.config import TrainConfig
from cm3leon.schedules import warmup_cosine
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.training.deepspeed_setup import Process, deepspeed_config, use_bf16
from cm3leon.training.optimizers import MuonAdamW
from cm3leon.training.sequences import Batch
from cm3leon.training.throughput import matmul_peak_flops

LogCallback = Callable[[int, dict[str, float]], None]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` at ``step``: :func:`~cm3leon.schedules.warmup_cosine`."""
    return warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)


def weighted_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy averaged with the batch's per-token weights."""
    return _weighted_mean(logits.flatten(0, 1), batch.targets.flatten(), batch.weights.flatten())


def _weighted_mean(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """Cross-entropy of ``logits`` (N, V) against ``targets`` (N,), averaged with ``weights``."""
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    weights = weights.to(losses.device)
    return (losses * weights).sum() / weights.sum().clamp(min=1e-8)


def training_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """:func:`weighted_loss` of ``model`` on ``batch``, computed on the targets alone: the
    model scores only the positions of weight > 0 and runs its matmuls on the batch's real
    tokens (``DecoderLM``'s ``select``), so padding and zero-weight targets (``<bos>``, CM3
    sentinels) cost no matmul FLOPs. The same loss as the padded forward, up to float
    summation order."""
    select = batch.weights > 0  # (B, T)
    logits = model(batch.inputs, cells=batch.cells, real=batch.real, select=select)
    return _weighted_mean(logits, batch.targets[select], batch.weights[select])


def optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (not on norms' gains or biases); with
    ``optimizer: muon`` the model's ``hidden_matrices()`` (the transformer blocks' weights) go
    to Muon at ``muon_lr`` instead (:class:`~cm3leon.training.optimizers.MuonAdamW`), the AdamW
    groups first (``train/lr`` logs the first group's rate)."""
    hidden = set()
    if config.optimizer == "muon":
        hidden = {id(p) for p in model.hidden_matrices() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
    for group in groups:
        group.update(lr=config.lr, betas=tuple(config.betas))
    matrices = [p for p in model.parameters() if id(p) in hidden]  # the model's order
    groups.append(
        {
            "params": matrices,
            "muon": True,
            "lr": config.muon_lr,
            "weight_decay": config.weight_decay,
        }
    )
    return MuonAdamW(groups, momentum=config.muon_momentum)


def schedule(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """The per-step learning-rate schedule of ``config`` (:func:`lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))


def training_engine(model: nn.Module, config: TrainConfig, world: int, bf16: bool):
    """``(engine, scheduler)``: the DeepSpeed engine of ``model`` with :func:`optimizer`,
    :func:`schedule` and :func:`~cm3leon.training.deepspeed_setup.deepspeed_config` (what
    :func:`train` runs; the throughput benchmarks time the same engine)."""
    import deepspeed

    adamw = optimizer(model, config)
    scheduler = schedule(adamw, config)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=adamw,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, world, bf16),
    )
    return engine, scheduler


def train(
    model: nn.Module,
    batch_for: Callable[[int, int, int, int], Batch],
    validation: dict[str, Sequence[Batch]],
    vocab: Vocab,
    config: TrainConfig,
    checkpoint_dir: str | Path,
    process: Process,
    on_log: LogCallback | None = None,
    desc: str = "train",
) -> nn.Module:
    """Train ``model``; ``batch_for(step, micro_step, rank, world)`` gives each micro-batch.

    ``validation`` maps a name to fixed batches scored with :func:`evaluate`; ``desc`` names
    the run in the progress output. Returns the trained module (unwrapped from the engine).
    """
    rank, world, device = process
    engine, scheduler = training_engine(model, config, world, use_bf16(config))
    checkpoint_dir = Path(checkpoint_dir)
    start, seen = 0, 0  # seen: weighted training targets so far, all ranks (compute spent)
    resumed = _resume(engine, checkpoint_dir, rank, desc)
    if resumed is not None:
        start, seen = resumed
        _log(on_log, rank, start, {"resumed_from_step": float(start)})
        _say(rank, f"{desc}: resumed from step {start}/{config.steps} ({checkpoint_dir})")
    if start >= config.steps:  # finished before: report the final validation again
        for name, batches in validation.items():
            metrics = evaluate(engine, batches, vocab, device)
            _log(on_log, rank, start, {f"{name}/{k}": v for k, v in metrics.items()})
    flops_per_token = getattr(engine.module, "flops_per_token", None)  # DecoderLM's
    peak = None
    if rank == 0 and flops_per_token is not None:
        dtype = torch.bfloat16 if use_bf16(config) else torch.float32
        peak = matmul_peak_flops(device.type, dtype, min_seconds=0.5)["peak_flops"]
    tokens, slots, flops, window_start = 0, 0, 0.0, time.perf_counter()
    run_tokens, run_flops, run_start = 0, 0.0, window_start  # this process's whole run
    progress = _Progress(desc, start, config.steps, rank)
    for step in range(start, config.steps):
        engine.train()
        losses = []
        for micro in range(config.gradient_accumulation_steps):
            batch = _to(batch_for(step, micro, rank, world), device)
            loss = training_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            tokens += batch.tokens * world
            seen += batch.tokens * world
            slots += batch.inputs.numel() * world
            run_tokens += batch.tokens * world
            if peak is not None:
                step_flops = batch.tokens * world * flops_per_token(batch.inputs.shape[1])
                flops += step_flops
                run_flops += step_flops
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            elapsed = time.perf_counter() - window_start
            logged = {
                "train/loss": _mean_over_ranks(sum(losses) / len(losses), world, device),
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_second": tokens / max(elapsed, 1e-9),
                "train/tokens_seen": float(seen),
                # weighted targets / positions computed: what padding leaves of the compute
                "train/useful_token_fraction": tokens / max(slots, 1),
            }
            if peak is not None:
                logged["train/mfu"] = flops / max(elapsed, 1e-9) / peak
                # the machine's speed beside the stage's seconds (a VM's can halve in an hour)
                logged["train/matmul_peak_gflops"] = peak / 1e9
            _log(on_log, rank, done, logged)
            progress.train(logged)
            tokens, slots, flops, window_start = 0, 0, 0.0, time.perf_counter()
        progress.step(done)
        if done % config.eval_every == 0 or done == config.steps:
            val = {}
            for name, batches in validation.items():
                metrics = evaluate(engine, batches, vocab, device)
                _log(on_log, rank, done, {f"{name}/{k}": v for k, v in metrics.items()})
                val[name] = metrics["loss"]
            progress.line(done, val)
        if done % config.checkpoint_every == 0 or done == config.steps:
            engine.save_checkpoint(
                str(checkpoint_dir),
                tag=f"step{done}",
                client_state={"step": done, "tokens_seen": seen},
            )
            _prune(checkpoint_dir, world, rank)
    if start < config.steps:  # the whole run: evaluation, logging and checkpoints included
        elapsed = time.perf_counter() - run_start
        whole = {"train/run_tokens_per_second": run_tokens / max(elapsed, 1e-9)}
        if peak is not None:
            whole["train/run_mfu"] = run_flops / max(elapsed, 1e-9) / peak
        _log(on_log, rank, config.steps, whole)
    progress.close()
    return engine.module


KEEP_CHECKPOINTS = 2  # the newest and one before it, the fallback if the newest is torn
# What loading a torn or truncated checkpoint raises (torch.load, DeepSpeed's own asserts).
_TORN = (OSError, EOFError, RuntimeError, ValueError, KeyError, AssertionError, pickle.PickleError)


def _tags(checkpoint_dir: Path) -> list[str]:
    """Checkpoint tags to try, best first: the one ``latest`` names (when that file is whole and
    its folder exists), then every ``step<N>`` folder, newest first."""
    tags = _tags_by_step(checkpoint_dir)
    latest = checkpoint_dir / "latest"
    named = latest.read_text(encoding="utf-8", errors="replace").strip() if latest.is_file() else ""
    if named in tags:
        tags.remove(named)
        tags.insert(0, named)
    return tags


def _resume(engine, checkpoint_dir: Path, rank: int, desc: str) -> tuple[int, int] | None:
    """Load the newest readable checkpoint: ``(step, tokens seen)``, or None to start afresh.

    DeepSpeed writes a tag's folder, then the ``latest`` pointer; a kill can leave the pointer
    empty or torn, or the newest folder half-written. Either way the next older complete
    checkpoint is loaded (with a line saying so) instead of failing on every rerun."""
    for tag in _tags(checkpoint_dir):
        try:
            _, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
        except _TORN as err:
            _say(
                rank,
                f"{desc}: checkpoint {checkpoint_dir / tag} is unreadable ({err}); "
                "trying an older one",
            )
            continue
        if client_state is None or "step" not in client_state:
            _say(rank, f"{desc}: checkpoint {checkpoint_dir / tag} is incomplete; skipped")
            continue
        return int(client_state["step"]), int(client_state.get("tokens_seen", 0))
    return None


def _prune(checkpoint_dir: Path, world: int, rank: int) -> None:
    """Keep only the newest :data:`KEEP_CHECKPOINTS` tags (a default run would otherwise keep
    every one: 1.45 GB); rank 0 deletes once every rank has written."""
    if world > 1:
        dist.barrier()
    if rank != 0:
        return
    for tag in _tags_by_step(checkpoint_dir)[KEEP_CHECKPOINTS:]:
        shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)


def _tags_by_step(checkpoint_dir: Path) -> list[str]:
    return sorted(
        (p.name for p in checkpoint_dir.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
        key=lambda name: int(name[4:]),
        reverse=True,
    )


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
    optional = (None if t is None else t.to(device) for t in (batch.cells, batch.real))
    moved = (t.to(device) for t in (batch.inputs, batch.targets, batch.weights, batch.query))
    return Batch(*moved, *optional)


def _mean_over_ranks(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item() / world)


def _log(on_log: LogCallback | None, rank: int, step: int, metrics: dict[str, float]) -> None:
    if on_log is not None and rank == 0:
        on_log(step, metrics)


def _say(rank: int, line: str) -> None:
    if rank == 0:
        tqdm.write(line, file=sys.stderr)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """Rank 0's progress on stderr: a tqdm bar on a terminal (none elsewhere) and one line per
    evaluation everywhere — what ``dvc repro`` and Prefect's logs show of a training run."""

    def __init__(self, desc: str, start: int, total: int, rank: int) -> None:
        self.desc, self.start, self.total, self.rank = desc, start, total, rank
        self.began = time.perf_counter()
        self.last: dict[str, float] = {}
        self.bar = tqdm(
            total=total,
            initial=start,
            desc=desc,
            unit="step",
            mininterval=5,
            file=sys.stderr,
            disable=None if rank == 0 else True,  # None: off when stderr is not a terminal
        )

    def train(self, logged: dict[str, float]) -> None:
        self.last = logged
        self.bar.set_postfix(
            loss=f"{logged['train/loss']:.3f}",
            tok_s=f"{logged['train/tokens_per_second']:,.0f}",
            refresh=False,
        )

    def step(self, done: int) -> None:
        self.bar.update(done - self.bar.n)

    def line(self, done: int, val: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.began
        eta = elapsed / max(done - self.start, 1) * (self.total - done)
        parts = [f"{self.desc}: step {done}/{self.total}"]
        if self.last:
            parts.append(f"loss {self.last['train/loss']:.3f}")
        parts += [f"{name} {loss:.3f}" for name, loss in val.items()]
        if self.last:
            parts.append(f"{self.last['train/tokens_per_second']:,.0f} tokens/s")
        parts.append(f"elapsed {_clock(elapsed)} ETA {_clock(eta)}")
        _say(self.rank, " | ".join(parts))

    def close(self) -> None:
        self.bar.close()
