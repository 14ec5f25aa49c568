"""Image-generation throughput of the decoder (issue: text-to-image decoding, DESIGN.md §9).

Measures, in one run on one randomly initialised ``DecoderLM`` and one set of prompts, image
tokens generated per second for a text-to-image workload: ``--prompts`` prompts of
``--prompt-len`` tokens (``<bos>``, retrieved context and a caption as random text ids,
``<break>``), each decoding exactly one image (64 image tokens, then ``<eos>``; a
``ModalityConstraint("image")`` with ``max_new_tokens = 65``). Configurations:

* ``cached`` / ``uncached``: :func:`cm3leon.decoding.generation.generate` greedy at CFG weight 1
  with and without the KV cache (outputs must be identical);
* ``cfg_batched`` / ``cfg_two_pass``: CFG weight 3 (greedy by default, so the outputs can be
  compared): ``generate``, which runs the conditional and unconditional streams in one forward
  per step, against a reference loop here that runs two KV-cached forwards per step, one over
  the conditional rows and one over the unconditional rows (outputs must be identical);
* ``hf_generate``: Hugging Face ``GPT2LMHeadModel.generate`` of the same shape, greedy, 64 new
  tokens, same prompts, with *no* modality constraint;
* ``hf_guided``: the same ``generate`` doing ``cfg_batched``'s work: classifier-free guidance
  at the same weight through its ``guidance_scale`` with the unconditional prompts as
  ``negative_prompt_ids`` (HF's ``UnbatchedClassifierFreeGuidanceLogitsProcessor``: a second,
  KV-cached forward of the unconditional rows per step) and the image-only constraint through
  ``prefix_allowed_tokens_fn``, greedy, exactly 64 image ids;

and reports each one's seconds per batch, image tokens/s and achieved FLOP/s against this
machine's measured matmul peak, plus the speedups cached/uncached, batched/two-pass CFG and
cm3leon cached / HF.

    python benchmarks/generation.py [--preset default] [--prompts 32] [--prompt-len 150] \\
        [--repeats 3] [--threads N] [--skip-hf]
    python benchmarks/generation.py --device cuda [--preset 350m]
    python benchmarks/generation.py --prompts 4 --prompt-len 40 --repeats 1      # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine, matmul_peak_flops, save_result
from train_throughput import gpt2_like

from cm3leon.config import ModelConfig
from cm3leon.decoding.generation import GenerationRequest, generate, left_pad
from cm3leon.decoding.processors import ModalityConstraint, image_run_lengths
from cm3leon.decoding.selector import Strategy, TokenSelector
from cm3leon.model.transformer import DecoderLM, TransformerShape
from cm3leon.tokenizers.vocab import Vocab

VOCAB = Vocab(text_size=512, image_size=256, num_sentinels=16, num_reserved=16)
IMAGE_TOKENS = 64  # one 8 x 8 image
MAX_NEW_TOKENS = IMAGE_TOKENS + 1  # the image, then the stop token
INIT_STD = 0.02  # normal(0, 0.02) everywhere: non-zero output projections, non-degenerate logits
CFG_WEIGHT = 3.0

Outputs = list[list[int]]


def make_prompts(
    vocab: Vocab, count: int, prompt_len: int, caption_len: int, seed: int
) -> tuple[Outputs, Outputs]:
    """``(conditional, unconditional)`` prompts of each of ``count`` requests.

    Conditional: ``<bos> context caption <break>``, ``prompt_len`` tokens, with the retrieved
    context and the caption random text ids; unconditional: the same context with the caption
    replaced by the CM3 mask, ``<bos> context <mask:0> <break>`` (as
    :meth:`cm3leon.inference.multimodal.MultimodalModel.prompts` builds it).
    """
    context_len = prompt_len - caption_len - 2
    generator = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        """``n`` random text ids."""
        ids = torch.randint(vocab.text_size, (n,), generator=generator)
        return vocab.text_to_vocab(ids.tolist())

    cond, uncond = [], []
    for _ in range(count):
        context = text(context_len)
        cond.append([vocab.bos, *context, *text(caption_len), vocab.brk])
        uncond.append([vocab.bos, *context, vocab.sentinel(0), vocab.brk])
    return cond, uncond


def build_model(shape: TransformerShape, device: torch.device, seed: int) -> DecoderLM:
    """A ``DecoderLM`` with every weight drawn from normal(0, ``INIT_STD``), in eval mode.

    The real init zeroes every block's output projections, which would make all blocks the
    identity and the logits depend on the last token only; speed does not depend on the weights
    but the output comparisons are only meaningful on a model whose every block matters.
    """
    torch.manual_seed(seed)
    model = DecoderLM(shape)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, INIT_STD)
    return model.to(device).eval()


@torch.no_grad()
def two_pass_generate(
    model: DecoderLM,
    vocab: Vocab,
    requests: Sequence[GenerationRequest],
    constraint: ModalityConstraint,
    max_new_tokens: int,
    seed: int,
) -> Outputs:
    """Reference CFG decoding: per step, one KV-cached forward over the conditional rows and a
    second one over the unconditional rows, each stream with its own cache and ``pad_mask``.

    Selection matches :func:`~cm3leon.decoding.generation.generate` exactly: the constraint
    masks both streams' logits, the (single) strategy's ``scores`` apply classifier-free
    guidance (and top-p, if asked), and a :class:`TokenSelector` seeded alike picks the token,
    so the two produce the same ids up to floating-point differences between the forwards.
    The trailing image-run length is tracked incrementally instead of rescanning the ids.
    """
    strategies = {r.strategy for r in requests}
    if len(strategies) != 1 or any(r.unconditional is None for r in requests):
        raise ValueError("the two-pass reference needs one strategy and unconditional prompts")
    strategy = strategies.pop()
    device = model.head.weight.device
    n = len(requests)
    caches, logits, runs = [], [], []
    for prompts in ([r.prompt for r in requests], [r.unconditional for r in requests]):
        ids, pad_mask = left_pad(prompts, vocab.pad)  # (n, T) each
        ids, pad_mask = ids.to(device), pad_mask.to(device)
        cache = model.new_cache(n, ids.shape[1] + max_new_tokens)
        logits.append(model(ids, kv_cache=cache, pad_mask=pad_mask)[:, -1])  # (n, V)
        caches.append(cache)
        runs.append(image_run_lengths(ids, vocab))  # (n,) trailing image run of the prompts
    run = runs[0]  # the constraint follows the conditional stream, as in generate
    stop = constraint.stop.to(device)  # (V,)
    selector = TokenSelector(seed, device)
    greedy = strategy.argmax
    generated = torch.zeros(n, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens = []
    for _ in range(max_new_tokens):
        allowed = constraint.allowed(run, generated).to(device)  # (n, V)
        cond, uncond = (x.float().masked_fill(~allowed, float("-inf")) for x in logits)
        token = selector(strategy.scores(cond, uncond), greedy)  # (n,)
        token = torch.where(done, torch.full_like(token, vocab.pad), token)
        tokens.append(token)
        done = done | stop[token]
        generated += (~done).long()
        if bool(done.all()):
            break
        run = torch.where(vocab.image_mask(token), run + 1, 0)
        step, step_mask = token[:, None], ~done[:, None]  # (n, 1) each
        logits = [model(step, kv_cache=c, pad_mask=step_mask)[:, -1] for c in caches]
    stops = set(stop.nonzero().flatten().tolist())
    outputs = []
    for row in torch.stack(tokens, 1).tolist():  # (n, steps)
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        outputs.append(row[:end])
    return outputs


def masks_to_device_if_needed(
    model: DecoderLM, vocab: Vocab, constraint: ModalityConstraint, prompts: Outputs
) -> str | None:
    """Try ``generate`` once with ``constraint`` as built (masks on the CPU); if that fails on
    the model's device, move the constraint's masks there and return what happened.

    ``ModalityConstraint.allowed`` combines its CPU masks with the ``run``/``generated`` tensors
    that ``generate`` keeps on the model's device, which ``torch.where`` rejects off the CPU.
    """
    device = model.head.weight.device
    if device.type == "cpu":
        return None
    requests = [GenerationRequest(p, Strategy.named("greedy")) for p in prompts]
    try:
        generate(model, vocab, requests, constraint, 2, seed=0)
        return None
    except RuntimeError as error:
        for name in ("image", "text", "stop"):
            setattr(constraint, name, getattr(constraint, name).to(device))
        generate(model, vocab, requests, constraint, 2, seed=0)  # now it must run
        return (
            f"generate() failed on {device} with the constraint's CPU masks "
            f"({str(error).splitlines()[0]}); masks moved to {device} for this benchmark"
        )


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (before and after every timed call)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def generation_flops(
    n_matmul: int, n_layer: int, d_model: int, prompt_lens: Sequence[int], new_tokens: int
) -> int:
    """Forward FLOPs to produce ``new_tokens`` tokens after each prompt (one row per stream).

    Per generated token ``2 N + 4 L d C``: ``N`` = parameters excluding the embedding tables
    (untied head included), 2 FLOPs each; ``4 L d C`` = ``QK^T`` and ``AV`` over the ``C`` keys
    the query attends to, with ``C = P + j`` for token ``j`` (0-based) after a prompt of ``P``.
    """
    total = 0
    for p in prompt_lens:
        contexts = new_tokens * p + new_tokens * (new_tokens - 1) // 2  # sum of P + j
        total += new_tokens * 2 * n_matmul + 4 * n_layer * d_model * contexts
    return total


def processed_flops(
    n_matmul: int, n_layer: int, d_model: int, prompt_lens: Sequence[int], fed_tokens: int
) -> int:
    """Forward FLOPs of a KV-cached decode that also counts the prefill: every prompt token and
    every fed generated token once, each ``2 N + 4 L d (t + 1)`` at 0-based position ``t``."""
    total = 0
    for p in prompt_lens:
        positions = p + fed_tokens
        total += positions * 2 * n_matmul + 4 * n_layer * d_model * positions * (positions + 1) // 2
    return total


def measure(
    configs: dict[str, Callable[[], Outputs]], repeats: int, device: torch.device
) -> tuple[dict[str, Outputs], dict[str, list[float]], dict]:
    """Outputs of one untimed warm-up call per config, then ``repeats`` rounds each timing one
    call per config and one matmul peak, in rotating order (load from other processes on a
    shared machine hits every config and the peak alike)."""
    outputs = {}
    for name, fn in configs.items():
        start = time.perf_counter()
        outputs[name] = fn()
        sync(device)
        print(f"  warm-up {name}: {time.perf_counter() - start:.2f} s", flush=True)
    names = [*configs, "matmul_peak"]
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    peaks: list[dict] = []
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            if name == "matmul_peak":
                peaks.append(matmul_peak_flops(device.type))
                continue
            sync(device)
            start = time.perf_counter()
            configs[name]()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
        print(
            f"  round {round_ + 1}/{repeats}: "
            + ", ".join(f"{name} {seconds[name][-1]:.2f} s" for name in configs)
            + f"; matmul peak {peaks[-1]['peak_flops'] / 1e9:.1f} GFLOP/s",
            flush=True,
        )
    peak = dict(max(peaks, key=lambda p: p["peak_flops"]))
    peak["rounds_peak_flops"] = [p["peak_flops"] for p in peaks]
    return outputs, seconds, peak


def compare(a: Outputs, b: Outputs) -> dict:
    """Whether two configs produced the same ids, and where they first differ."""
    differing = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    first = None
    if differing:
        x, y = a[differing[0]], b[differing[0]]
        first = next((j for j, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), None)
    return {
        "same_outputs": not differing,
        "rows_differing": len(differing),
        "first_row_differing": differing[0] if differing else None,
        "first_position_differing": first,
    }


def valid_images(outputs: Outputs, vocab: Vocab) -> bool:
    """Every output is exactly one image: ``IMAGE_TOKENS`` image ids."""
    return all(len(o) == IMAGE_TOKENS and all(vocab.is_image(t) for t in o) for o in outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", help="cm3leon model preset")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per batch (B)")
    parser.add_argument("--prompt-len", type=int, default=150, help="tokens per prompt")
    parser.add_argument(
        "--caption-len", type=int, default=24, help="caption tokens at the end of each prompt"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per config")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--cfg-strategy",
        choices=("greedy", "top_p"),
        default="greedy",
        help="selection of the CFG comparison (top_p samples with the same seeded selector in "
        "both loops, so the outputs still must agree)",
    )
    parser.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    if args.prompts < 1 or args.repeats < 1:
        parser.error("--prompts and --repeats must be >= 1")
    if not 0 <= args.caption_len <= args.prompt_len - 2:
        parser.error("--caption-len must be in [0, prompt-len - 2]")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)

    vocab = VOCAB
    shape = TransformerShape.from_config(ModelConfig(preset=args.preset), vocab.size)
    if args.prompt_len + MAX_NEW_TOKENS > shape.max_seq_len:
        parser.error(
            f"--prompt-len {args.prompt_len} + {MAX_NEW_TOKENS} new tokens exceeds the preset's "
            f"max_seq_len {shape.max_seq_len}"
        )
    machine = describe_machine()
    print(f"machine: {machine['cpu']} x{machine['cores']}, gpu {machine['gpu']}", flush=True)

    model = build_model(shape, device, args.seed)
    n_params = model.num_parameters()
    n_matmul = model.num_parameters(exclude_embeddings=True)
    cond, uncond = make_prompts(vocab, args.prompts, args.prompt_len, args.caption_len, args.seed)
    B = args.prompts
    print(
        f"model {args.preset}: {shape.to_dict()}, {n_params / 1e6:.2f}M params; {B} prompts of "
        f"{args.prompt_len} tokens (unconditional {len(uncond[0])}), {IMAGE_TOKENS} image "
        "tokens each",
        flush=True,
    )

    constraint = ModalityConstraint(vocab, IMAGE_TOKENS, "image", (vocab.eos,))
    constraint_note = masks_to_device_if_needed(model, vocab, constraint, cond[:1])
    if constraint_note:
        print(f"note: {constraint_note}", flush=True)
    plain = [GenerationRequest(c, Strategy.named("greedy")) for c in cond]
    cfg_strategy = Strategy.named(args.cfg_strategy, cfg_weight=CFG_WEIGHT)
    guided = [GenerationRequest(c, cfg_strategy, u) for c, u in zip(cond, uncond, strict=True)]

    def run_generate(requests: list[GenerationRequest], use_cache: bool) -> Outputs:
        """cm3leon's batched generation of one image per request."""
        return generate(
            model, vocab, requests, constraint, MAX_NEW_TOKENS, args.seed, use_cache=use_cache
        )

    configs: dict[str, Callable[[], Outputs]] = {
        "cached": lambda: run_generate(plain, True),
        "uncached": lambda: run_generate(plain, False),
        "cfg_batched": lambda: run_generate(guided, True),
        "cfg_two_pass": lambda: two_pass_generate(
            model, vocab, guided, constraint, MAX_NEW_TOKENS, args.seed
        ),
    }
    hf_info = None
    if not args.skip_hf:
        import transformers

        transformers.logging.set_verbosity_error()  # no per-call generation-config notices
        torch.manual_seed(args.seed)
        hf_model = gpt2_like(shape, device).eval()  # GPT-2's own init: normal(0, 0.02)
        hf_ids = torch.tensor(cond, device=device)  # equal lengths: no padding
        hf_mask = torch.ones_like(hf_ids)

        hf_uncond, hf_uncond_mask = (t.to(device) for t in left_pad(uncond, vocab.pad))
        image_ids = list(range(vocab.image_offset, vocab.size))
        hf_guidance = {
            "guidance_scale": CFG_WEIGHT,
            "negative_prompt_ids": hf_uncond,
            "negative_prompt_attention_mask": hf_uncond_mask.long(),
            "prefix_allowed_tokens_fn": lambda batch_id, ids: image_ids,
        }

        def run_hf(**extra) -> Outputs:
            """Hugging Face greedy generation of exactly ``IMAGE_TOKENS`` ids; ``extra``: the
            guidance and constraint arguments of ``hf_guided`` (none: unconstrained)."""
            out = hf_model.generate(
                input_ids=hf_ids,
                attention_mask=hf_mask,
                max_new_tokens=IMAGE_TOKENS,
                min_new_tokens=IMAGE_TOKENS,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=vocab.pad,
                **extra,
            )
            return out[:, hf_ids.shape[1] :].tolist()

        configs["hf_generate"] = run_hf
        configs["hf_guided"] = lambda: run_hf(**hf_guidance)
        hf_info = {
            "transformers_version": transformers.__version__,
            "attn_implementation": getattr(hf_model.config, "_attn_implementation", None),
            "parameters": sum(p.numel() for p in hf_model.parameters()),
            "note": (
                "GPT2LMHeadModel of the same shape (untied head, exact GELU, sdpa attention, "
                "biases and LayerNorm affines that DecoderLM lacks), GPT-2's own normal(0, 0.02) "
                "init, greedy generate with max_new_tokens = min_new_tokens = 64, no modality "
                "constraint (it may emit any id, so its outputs are not images), no CFG. It "
                "feeds 63 generated tokens (cm3leon feeds all 64 to get the logits of the stop "
                "token); FLOPs use the same formula as cm3leon's cached config."
            ),
        }

    load_before = os.getloadavg()
    outputs, seconds, peak = measure(configs, args.repeats, device)
    load_after = os.getloadavg()

    cond_lens = [len(c) for c in cond]
    uncond_lens = [len(u) for u in uncond]
    streams = {
        "cached": cond_lens,
        "uncached": cond_lens,
        "cfg_batched": cond_lens + uncond_lens,
        "cfg_two_pass": cond_lens + uncond_lens,
        "hf_generate": cond_lens,
        "hf_guided": cond_lens + uncond_lens,
    }
    dims = (n_matmul, shape.n_layer, shape.d_model)
    results = {}
    for name, times in seconds.items():
        best = min(times)
        flops = generation_flops(*dims, streams[name], IMAGE_TOKENS)
        fed = IMAGE_TOKENS - 1 if name.startswith("hf_") else IMAGE_TOKENS
        with_prefill = processed_flops(*dims, streams[name], fed)
        results[name] = {
            "seconds_per_batch": best,
            "round_seconds": times,
            "image_tokens_per_second": B * IMAGE_TOKENS / best,
            "streams_per_prompt": len(streams[name]) // B,
            "flops_per_batch": flops,
            "achieved_flops": flops / best,
            "peak_fraction": flops / best / peak["peak_flops"],
            "flops_per_batch_with_prefill": with_prefill,
            "achieved_flops_with_prefill": with_prefill / best,
            "peak_fraction_with_prefill": with_prefill / best / peak["peak_flops"],
            "valid_images": valid_images(outputs[name], vocab),
        }
    results["cached"]["strategy"] = results["uncached"]["strategy"] = "greedy, cfg_weight 1"
    for name in ("cfg_batched", "cfg_two_pass"):
        results[name]["strategy"] = f"{args.cfg_strategy}, cfg_weight {CFG_WEIGHT}"
    if hf_info:
        hf_tokens = [t for row in outputs["hf_generate"] for t in row]
        results["hf_generate"].update(
            hf_info,
            strategy="greedy, no CFG, no modality constraint",
            image_id_fraction=sum(vocab.is_image(t) for t in hf_tokens) / len(hf_tokens),
        )
        results["hf_guided"].update(
            hf_info,
            note=(
                "the same GPT2LMHeadModel, greedy generate with guidance_scale = cfg_weight, "
                "negative_prompt_ids = the unconditional prompts (all one length, no padding), "
                "prefix_allowed_tokens_fn = the image ids, max_new_tokens = min_new_tokens = 64"
            ),
            strategy=f"greedy, cfg_weight {CFG_WEIGHT}, image ids only",
        )

    def rate(name: str) -> float:
        """Image tokens per second of one config."""
        return results[name]["image_tokens_per_second"]

    comparisons = {
        "cache": {
            "speedup": rate("cached") / rate("uncached"),
            "definition": "image tokens/s cached / uncached",
            **compare(outputs["cached"], outputs["uncached"]),
        },
        "cfg": {
            "speedup": rate("cfg_batched") / rate("cfg_two_pass"),
            "definition": "image tokens/s cfg_batched / cfg_two_pass",
            **compare(outputs["cfg_batched"], outputs["cfg_two_pass"]),
        },
    }
    if hf_info:
        comparisons["hf"] = {
            "cm3leon_cached_over_hf": rate("cached") / rate("hf_generate"),
            "definition": "image tokens/s cm3leon cached / HF GPT2LMHeadModel.generate",
            "note": hf_info["note"],
        }
        comparisons["hf_guided"] = {
            "cm3leon_cfg_batched_over_hf_guided": rate("cfg_batched") / rate("hf_guided"),
            "definition": (
                "image tokens/s cm3leon cfg_batched / HF generate with guidance_scale, "
                "negative_prompt_ids and prefix_allowed_tokens_fn (the same guided, "
                "constrained work)"
            ),
        }

    print()
    print(
        f"{'config':<14s}{'s/batch':>9s}{'img tok/s':>11s}{'GFLOP/s':>9s}{'peak':>7s}"
        f"{'GFLOP/s+pre':>13s}{'peak+pre':>10s}{'images ok':>11s}"
    )
    for name, r in results.items():
        print(
            f"{name:<14s}{r['seconds_per_batch']:9.3f}{r['image_tokens_per_second']:11.1f}"
            f"{r['achieved_flops'] / 1e9:9.2f}{100 * r['peak_fraction']:6.1f}%"
            f"{r['achieved_flops_with_prefill'] / 1e9:13.2f}"
            f"{100 * r['peak_fraction_with_prefill']:9.1f}%"
            f"{'n/a' if name == 'hf_generate' else str(r['valid_images']):>11s}"
        )
    print(
        f"matmul peak: {peak['peak_flops'] / 1e9:.1f} GFLOP/s (fp32, n={peak['at_size']}); "
        "GFLOP/s = 2N + 4LdC per generated token, +pre adds the prefill"
    )
    for key, label in (("cache", "cached / uncached"), ("cfg", "cfg batched / two-pass")):
        c = comparisons[key]
        print(f"{label}: {c['speedup']:.2f}x (same outputs: {c['same_outputs']})")
    if hf_info:
        print(
            f"cm3leon cached / HF generate: {comparisons['hf']['cm3leon_cached_over_hf']:.2f}x "
            f"(HF unconstrained: {100 * results['hf_generate']['image_id_fraction']:.0f}% of its "
            "ids are image ids)"
        )
        print(
            "cm3leon cfg batched / HF guided, constrained generate: "
            f"{comparisons['hf_guided']['cm3leon_cfg_batched_over_hf_guided']:.2f}x"
        )

    payload = {
        "benchmark": "generation",
        "machine": machine,
        "load_average_1_5_15min": {"before": load_before, "after": load_after},
        "args": vars(args),
        "device": str(device),
        "precision": "fp32",
        "model": {
            "class": "cm3leon.model.transformer.DecoderLM",
            "preset": args.preset,
            "shape": shape.to_dict(),
            "init": f"every weight normal(0, {INIT_STD}) (random model, not trained)",
            "parameters": n_params,
            "parameters_excluding_embeddings": n_matmul,
        },
        "vocab": vocab.to_dict(),
        "workload": {
            "prompts": B,
            "prompt_len": args.prompt_len,
            "caption_len": args.caption_len,
            "context_len": args.prompt_len - args.caption_len - 2,
            "unconditional_prompt_len": len(uncond[0]),
            "prompt_format": "<bos> context caption <break> (random text ids)",
            "unconditional_format": "<bos> context <mask:0> <break>",
            "image_tokens": IMAGE_TOKENS,
            "max_new_tokens": MAX_NEW_TOKENS,
            "constraint": "ModalityConstraint(vocab, 64, 'image', (eos,)) for cm3leon configs",
            "constraint_workaround": constraint_note,
            "cfg_weight": CFG_WEIGHT,
            "seed": args.seed,
        },
        "flops_formula": (
            "flops_per_batch = sum over streams (prompt rows; CFG has a conditional and an "
            "unconditional row per prompt) and generated image tokens j = 0..63 of "
            "2 N + 4 L d (P + j): N = DecoderLM parameters excluding the embedding tables "
            "(untied head included), L layers, d = d_model, P the stream's prompt length; the "
            "same useful work for every config (uncached recomputes more, not counted). "
            "*_with_prefill adds the prompt: every position t = 0..P+63 (P+62 for HF) a "
            "KV-cached decode feeds, 2 N + 4 L d (t + 1) each"
        ),
        "peak_fraction_definition": "achieved_flops / measured matmul peak",
        "matmul_peak": {**peak, "dtype": "torch.float32"},
        "configs": results,
        "comparisons": comparisons,
    }
    path = save_result(f"generation_{device.type}", payload)
    print(f"wrote {path}")

    failures = [
        f"{key} comparison: outputs differ ({c['rows_differing']} rows)"
        for key, c in comparisons.items()
        if "same_outputs" in c and not c["same_outputs"]
    ] + [
        f"{name}: not one image of {IMAGE_TOKENS} image ids per prompt"
        for name, r in results.items()
        if name != "hf_generate" and not r["valid_images"]
    ]
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
