"""Training throughput of the pretraining transformer (issue: pretrain stage).

Measures, in one run on one machine, tokens/s of full training steps (forward, backward,
gradient clipping at 1.0, AdamW step) on a fixed synthetic batch for three loops over the same
model shape:

* ``deepspeed``: the real DeepSpeed engine of ``cm3leon.training.loop.train`` (its
  ``training_engine``: cm3leon's AdamW and LambdaLR schedule, ``deepspeed_config``), with
  ``engine(inputs)``, ``weighted_loss``, ``engine.backward`` and ``engine.step`` (a batch
  without padding: the ideal the stage's own steps are measured against,
  ``benchmarks/pretrain_stage.py``);
* ``plain``: the same ``DecoderLM`` with a hand-written PyTorch loop;
* ``hf_gpt2``: Hugging Face ``GPT2LMHeadModel`` of the same shape, same hand-written loop;

and reports each loop's MFU against this machine's measured matmul peak, the DeepSpeed overhead
over the plain loop and cm3leon's speed over GPT-2.

    python benchmarks/train_throughput.py [--preset default] [--batch 16] [--seq-len 256]
    python benchmarks/train_throughput.py --zero-stage 1        # only the pipeline's stage
    python benchmarks/train_throughput.py --params params.yaml  # the pretrain stage's model and
                                                                # numerics (base.numerics)
    python benchmarks/train_throughput.py --device cuda --bf16 --preset 350m --batch 8 \\
        --seq-len 2048 [--skip-hf]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine, matmul_peak_flops, save_result, timed

from cm3leon import numerics
from cm3leon.config import ModelConfig, TrainConfig, load_params
from cm3leon.model.transformer import DecoderLM, TransformerShape
from cm3leon.training.deepspeed_setup import (
    deepspeed_config,
    init_distributed,
    use_bf16,
)
from cm3leon.training.loop import optimizer, schedule, training_engine, weighted_loss
from cm3leon.training.sequences import Batch

IMAGE_CODES, IMAGE_TOKENS = 256, 64  # with --params: the default VQ's codebook and 8 x 8 grid
TARGETS = {
    "deepspeed_overhead_max": 0.10,  # 1 - tokens/s(DeepSpeed) / tokens/s(plain)
    "plain_over_hf_min": 1.0,  # tokens/s(cm3leon plain) / tokens/s(HF GPT-2)
    "deepspeed_mfu_min_cpu": 0.6,
    "deepspeed_mfu_min_gpu_bf16": 0.35,
}


def synthetic_batch(batch: int, seq_len: int, vocab: int, device: torch.device) -> Batch:
    ids = torch.randint(vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    return Batch(
        inputs=ids[:, :-1].contiguous().to(device),
        targets=ids[:, 1:].contiguous().to(device),
        weights=torch.ones(batch, seq_len, device=device),
        query=torch.ones(batch, seq_len, dtype=torch.bool, device=device),
    )


def gpt2_like(shape: TransformerShape, device: torch.device) -> torch.nn.Module:
    """``GPT2LMHeadModel`` of the same shape: untied head, exact GELU, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=shape.vocab_size,
        n_positions=shape.max_seq_len,
        n_embd=shape.d_model,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        activation_function="gelu",  # cm3leon uses exact GELU (GPT-2's default is tanh)
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,  # cm3leon's head is untied: same matmul FLOPs
        bos_token_id=None,  # GPT-2's 50256 lies outside this vocabulary
        eos_token_id=None,
        use_cache=False,
    )
    try:
        model = GPT2LMHeadModel(config, attn_implementation="sdpa")
    except (TypeError, ValueError):
        config._attn_implementation = "sdpa"
        model = GPT2LMHeadModel(config)
    return model.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def deepspeed_step_fn(model, train_config: TrainConfig, batch: Batch, device, bf16: bool):
    engine, _ = training_engine(model, train_config, 1, bf16)
    engine.train()

    def step() -> float:
        loss = weighted_loss(engine(batch.inputs), batch)
        engine.backward(loss)
        engine.step()
        value = loss.item()  # the real loop reads the loss every step
        sync(device)
        return value

    return engine, step


def plain_step_fn(model, train_config: TrainConfig, batch: Batch, device, bf16: bool, hf: bool):
    adamw = optimizer(model, train_config)
    scheduler = schedule(adamw, train_config)
    model.train()

    def autocast():
        if bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> float:
        with autocast():
            logits = model(batch.inputs).logits if hf else model(batch.inputs)
            loss = weighted_loss(logits, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        adamw.step()
        scheduler.step()
        adamw.zero_grad(set_to_none=True)
        value = loss.item()
        sync(device)
        return value

    return model, step


def measure(steps: dict, args, dtype: torch.dtype) -> tuple[dict[str, dict], dict]:
    """Seconds per step of every loop and the matmul peak, measured alike.

    After ``args.warmup`` untimed steps per loop, ``args.rounds`` rounds each time one
    :func:`timed` window per loop plus one :func:`matmul_peak_flops`, in rotating order, so
    that load from other processes on a shared machine hits loops and peak alike; the best
    window of each loop and the best peak count (every window is kept in the result).
    """
    warmup = {name: [step() for _ in range(args.warmup)] for name, step in steps.items()}
    names = [*steps, "matmul_peak"]
    windows: dict[str, list[float]] = {name: [] for name in steps}
    peaks: list[dict] = []
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            if name == "matmul_peak":
                peaks.append(matmul_peak_flops(args.device, dtype))
            else:
                window = args.seconds / args.rounds
                windows[name].append(timed(steps[name], min_seconds=window, min_repeats=1))
        print(
            f"  round {round_ + 1}/{args.rounds}: "
            + ", ".join(f"{name} {1 / windows[name][-1]:.3f}" for name in steps)
            + f" steps/s; matmul peak {peaks[-1]['peak_flops'] / 1e9:.1f} GFLOP/s",
            flush=True,
        )
    loops = {
        name: {
            "seconds_per_step": min(windows[name]),
            "window_seconds_per_step": windows[name],
            "warmup_losses": warmup[name],
            "final_loss": steps[name](),
        }
        for name in steps
    }
    peak = dict(max(peaks, key=lambda p: p["peak_flops"]))
    peak["rounds_peak_flops"] = [p["peak_flops"] for p in peaks]
    return loops, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", help="cm3leon model preset")
    parser.add_argument(
        "--params",
        default=None,
        help="take the model (preset and overrides: heads, image cells, rotary) and the "
        "micro-batch from this params file's pretrain section, the shape the pretrain stage "
        "trains (--preset and --batch are then ignored)",
    )
    parser.add_argument("--vocab", type=int, default=800, help="vocabulary size")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 (GPU only): autocast / DS bf16")
    parser.add_argument(
        "--zero-stage",
        default=f"{TrainConfig().zero_stage},0,1",
        help="DeepSpeed ZeRO stage(s), comma-separated; the first one gives the verdicts "
        "(default: the pipeline's train.zero_stage, then stages 0 and 1 for comparison)",
    )
    parser.add_argument("--skip-hf", action="store_true", help="skip the transformers loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loop")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved timing windows per loop (and peaks)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="timing per loop (default 20 CPU, 10 GPU)"
    )
    args = parser.parse_args()
    if args.params is not None:
        # the stage's kernels (base.numerics), so "the same machine" means the same arithmetic;
        # re-executes this process once when that changes the environment
        found = numerics.read_numerics(args.params)
        if found is not None:
            numerics.pin_process(*found)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    if args.bf16 and not gpu:
        parser.error("--bf16 is for --device cuda (CPU training runs fp32, as the pipeline does)")
    if not gpu and torch.cuda.is_available():
        parser.error("a GPU is visible: DeepSpeed would train on it; use --device cuda")
    if args.seconds is None:
        args.seconds = 10.0 if gpu else 20.0
    stages = list(dict.fromkeys(int(s) for s in args.zero_stage.split(",")))

    if args.params is not None:
        pretrain = load_params(args.params).pretrain
        args.preset, args.batch = pretrain.model.preset, pretrain.train.micro_batch_size
        image_offset = args.vocab - IMAGE_CODES  # image ids last, as the tokenizer lays them out
        shape = TransformerShape.from_config(pretrain.model, args.vocab, image_offset, IMAGE_TOKENS)
    else:
        shape = TransformerShape.from_config(ModelConfig(preset=args.preset), args.vocab)
    if args.seq_len > shape.max_seq_len:
        parser.error(f"--seq-len {args.seq_len} exceeds the preset's max_seq_len")

    _, _, device = init_distributed()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    machine = describe_machine()
    print(f"machine: {machine['cpu']} x{machine['cores']}, gpu {machine['gpu']}", flush=True)

    torch.manual_seed(0)
    batch = synthetic_batch(args.batch, args.seq_len, args.vocab, device)
    tokens_per_step = args.batch * args.seq_len
    reference = DecoderLM(shape)
    flops_per_token = reference.flops_per_token(args.seq_len)
    n_params = reference.num_parameters()
    n_matmul_params = reference.num_parameters(exclude_embeddings=True)
    del reference
    print(
        f"model {args.preset}: {shape.to_dict()}, {n_params / 1e6:.2f}M params, "
        f"{flops_per_token / 1e6:.1f} MFLOP/token at T={args.seq_len}; "
        f"batch {args.batch} x {args.seq_len} = {tokens_per_step} tokens/step",
        flush=True,
    )

    steps, extra = {}, {}
    keep = []  # engines and models stay alive until every loop has been timed
    for stage in stages:
        train_config = TrainConfig(
            micro_batch_size=args.batch,
            zero_stage=stage,
            precision="bf16" if args.bf16 else "fp32",
            steps=10**6,  # long schedule: the lr stays in warmup, as early in a real run
        )
        torch.manual_seed(0)
        model = DecoderLM(shape).to(device)
        bf16 = use_bf16(train_config)
        engine, steps[f"deepspeed_zero{stage}"] = deepspeed_step_fn(
            model, train_config, batch, device, bf16
        )
        extra[f"deepspeed_zero{stage}"] = {
            "deepspeed_config": deepspeed_config(train_config, 1, bf16)
        }
        keep.append(engine)

    plain_config = TrainConfig(micro_batch_size=args.batch, steps=10**6)
    torch.manual_seed(0)
    model, steps["plain"] = plain_step_fn(
        DecoderLM(shape).to(device), plain_config, batch, device, args.bf16, hf=False
    )
    keep.append(model)

    hf_note = None
    if not args.skip_hf:
        import transformers

        torch.manual_seed(0)
        model, steps["hf_gpt2"] = plain_step_fn(
            gpt2_like(shape, device), plain_config, batch, device, args.bf16, hf=True
        )
        keep.append(model)
        extra["hf_gpt2"] = {
            "transformers_version": transformers.__version__,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "config": {k: v for k, v in model.config.to_dict().items() if k.startswith("n_")},
        }
        hf_note = (
            "GPT2LMHeadModel of the same shape (untied head, exact GELU, dropouts 0, sdpa "
            "attention). Unlike cm3leon's DecoderLM it has bias terms in every linear layer and "
            "learnable LayerNorm weights/biases (a few extra elementwise ops and parameters); its "
            "MFU uses cm3leon's FLOPs per token since the matmul shapes are identical."
        )

    load_before = os.getloadavg()
    loops, peak = measure(steps, args, dtype)
    load_after = os.getloadavg()
    for name, loop in loops.items():
        tokens_per_second = tokens_per_step / loop["seconds_per_step"]
        loop.update(
            steps_per_second=1 / loop["seconds_per_step"],
            tokens_per_second=tokens_per_second,
            achieved_flops=tokens_per_second * flops_per_token,
            mfu=tokens_per_second * flops_per_token / peak["peak_flops"],
            **extra.get(name, {}),
        )
    del steps, keep

    ds = loops[f"deepspeed_zero{stages[0]}"]
    plain = loops["plain"]
    mfu_target = TARGETS["deepspeed_mfu_min_gpu_bf16" if gpu else "deepspeed_mfu_min_cpu"]
    overhead = 1 - ds["tokens_per_second"] / plain["tokens_per_second"]
    verdicts = {
        "deepspeed_loop": f"deepspeed_zero{stages[0]}",
        "deepspeed_overhead": overhead,
        "deepspeed_overhead_by_stage": {
            name: 1 - loop["tokens_per_second"] / plain["tokens_per_second"]
            for name, loop in loops.items()
            if name.startswith("deepspeed")
        },
        "deepspeed_overhead_target_max": TARGETS["deepspeed_overhead_max"],
        "deepspeed_overhead_met": overhead <= TARGETS["deepspeed_overhead_max"],
        "deepspeed_mfu": ds["mfu"],
        "deepspeed_mfu_target_min": mfu_target,
        "deepspeed_mfu_met": ds["mfu"] >= mfu_target,
    }
    if "hf_gpt2" in loops:
        ratio = plain["tokens_per_second"] / loops["hf_gpt2"]["tokens_per_second"]
        verdicts.update(
            plain_over_hf=ratio,
            plain_over_hf_target_min=TARGETS["plain_over_hf_min"],
            plain_over_hf_met=ratio >= TARGETS["plain_over_hf_min"],
        )

    print()
    print(f"{'loop':<18s}{'steps/s':>10s}{'tokens/s':>12s}{'GFLOP/s':>10s}{'MFU':>8s}")
    for name, loop in loops.items():
        print(
            f"{name:<18s}{loop['steps_per_second']:10.3f}{loop['tokens_per_second']:12.0f}"
            f"{loop['achieved_flops'] / 1e9:10.1f}{100 * loop['mfu']:7.1f}%"
        )
    print(f"matmul peak: {peak['peak_flops'] / 1e9:.1f} GFLOP/s ({dtype}, n={peak['at_size']})")

    def mark(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    print(
        f"DeepSpeed overhead ({verdicts['deepspeed_loop']}) vs plain: {100 * overhead:.1f}% "
        f"(target <= {100 * TARGETS['deepspeed_overhead_max']:.0f}%): "
        f"{mark(verdicts['deepspeed_overhead_met'])}"
    )
    if "plain_over_hf" in verdicts:
        print(
            f"cm3leon plain / HF GPT-2 tokens/s: {verdicts['plain_over_hf']:.3f} "
            f"(target >= {TARGETS['plain_over_hf_min']:.1f}): {mark(verdicts['plain_over_hf_met'])}"
        )
    print(
        f"DeepSpeed MFU: {100 * ds['mfu']:.1f}% (target >= {100 * mfu_target:.0f}%): "
        f"{mark(verdicts['deepspeed_mfu_met'])}"
    )

    payload = {
        "benchmark": "train_throughput",
        "machine": machine,
        "load_average_1_5_15min": {"before": load_before, "after": load_after},
        "args": vars(args),
        "device": str(device),
        "precision": "bf16" if args.bf16 else "fp32",
        "model": {
            "class": "cm3leon.model.transformer.DecoderLM",
            "preset": args.preset,
            "shape": shape.to_dict(),
            "parameters": n_params,
            "parameters_excluding_embeddings": n_matmul_params,
        },
        "tokens_per_step": tokens_per_step,
        "flops_per_token": flops_per_token,
        "flops_formula": (
            "DecoderLM.flops_per_token(seq_len) = 6 N + 12 L d T (N = parameters excluding the "
            "embedding tables, untied head included; L layers, d = d_model, T = seq_len); the "
            "same figure is used for GPT-2, whose matmul shapes are identical"
        ),
        "mfu_definition": "tokens/s x flops_per_token / measured matmul peak",
        "matmul_peak": {**peak, "dtype": str(dtype)},
        "loops": loops,
        "hf_note": hf_note,
        "targets": TARGETS,
        "verdicts": verdicts,
    }
    path = save_result(f"train_throughput_{'cuda' if gpu else 'cpu'}", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
