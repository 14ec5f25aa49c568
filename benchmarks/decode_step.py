"""One KV-cached decode step: the library's eager forward against a static-shape compiled step.

Issue "throughput where it counts" asks for cached generation at batch 32 at >= 25% of the
measured matmul peak and names the usual levers (``torch.compile``, static caches). Before
building a compiled path into :func:`cm3leon.decoding.generation.generate`, this measures
what one decode step gains, on one randomly initialised ``DecoderLM`` (``--preset``; the
weights of ``benchmarks/generation.py``'s ``build_model``) after a prefill of ``--prompt-len``
tokens, at several batch sizes:

* ``eager``: ``DecoderLM.forward`` of one new token per row with the library's ``KVCache``
  (unpadded rows: the library's fastest path, SDPA over the ``past + 1`` filled keys);
* ``static``: the same arithmetic written for fixed shapes — the cache preallocated at its
  full length ``L``, the new keys written with ``index_copy_`` at a position held in a tensor,
  SDPA over all ``L`` slots with a ``(B, L)`` mask of the filled ones — so that every step has
  the same shapes; run eager (``static_eager``) and under ``torch.compile(dynamic=False,
  fullgraph=True)`` (``static_compiled``, compiled once per batch size; the compile seconds are
  reported).

Per configuration: milliseconds per step (best of ``--repeats`` windows), achieved FLOP/s per
``benchmarks/generation.py``'s count (``2 N + 4 L d C`` per token, ``C`` keys attended) and its
fraction of the fp32 matmul peak measured in the same run. Agreement: from the same prefill,
``--check-steps`` greedy steps (image ids, cell embeddings advanced as the library does) by the
eager forward and by the compiled step; the JSON records the largest logit difference over
the rows whose tokens have agreed so far (a row whose tokens once split keeps a different
cache, even when its tokens meet again) and how many rows' greedy tokens differ, and from
which step (an exact tie of the two best logits is split either way by rounding).

    python benchmarks/decode_step.py [--preset default] [--prompt-len 150] \\
        [--batches 1 32 64 512] [--threads 2]

Writes ``benchmarks/results/decode_step_<device>.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from generation import VOCAB, build_model
from machine import describe_machine, matmul_peak_flops, save_result, timed

from cm3leon.config import ModelConfig
from cm3leon.model.transformer import DecoderLM, TransformerShape


class StaticDecoder:
    """Fixed-shape decode steps of ``model`` for ``batch`` rows and ``length`` cache slots."""

    def __init__(self, model: DecoderLM, batch: int, length: int) -> None:
        shape = model.shape
        if shape.rotary:
            raise ValueError("the static step covers learned positions only (rotary: false)")
        self.model, self.batch, self.length = model, batch, length
        size = (batch, shape.n_head, length, shape.head_dim)
        reference = model.head.weight
        self.keys = [torch.zeros(size, dtype=reference.dtype) for _ in range(shape.n_layer)]
        self.values = [torch.zeros(size, dtype=reference.dtype) for _ in range(shape.n_layer)]
        self.filled = torch.zeros(batch, length, dtype=torch.bool)

    def load(self, cache, filled: int) -> None:
        """Copy a library ``KVCache`` holding ``filled`` positions into the static slots."""
        for mine, theirs in ((self.keys, cache.keys), (self.values, cache.values)):
            for layer, tensor in enumerate(theirs):
                mine[layer][:, :, :filled] = tensor[:, :, :filled]
        self.filled.zero_()
        self.filled[:, :filled] = True

    def step(
        self, token: torch.Tensor, position: torch.Tensor, cell: torch.Tensor, slot: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``(B, V)`` of one new token per row: ``token``, ``position``, ``cell`` (B,),
        written at cache slot ``slot`` (a one-element tensor, so the shapes never change)."""
        model, B = self.model, self.batch
        D, H, hd = model.shape.d_model, model.shape.n_head, model.shape.head_dim
        x = model.token_embedding(token) + model.position_embedding(position)
        if model.cell_embedding is not None:
            x = x + model.cell_embedding(cell)
        x = x[:, None]  # (B, 1, D)
        self.filled.index_fill_(1, slot, True)
        mask = self.filled[:, None, None, :]  # (B, 1, 1, L)
        for layer, block in enumerate(model.blocks):
            q, k, v = block.attn.qkv_proj(block.attn_norm(x)).split(D, dim=-1)
            q, k, v = (t.view(B, 1, H, hd).transpose(1, 2) for t in (q, k, v))
            self.keys[layer].index_copy_(2, slot, k)
            self.values[layer].index_copy_(2, slot, v)
            y = F.scaled_dot_product_attention(
                q, self.keys[layer], self.values[layer], attn_mask=mask
            )
            x = x + block.attn.out_proj(y.transpose(1, 2).reshape(B, 1, D))
            x = x + block.mlp(block.mlp_norm(x))
        return model.head(model.final_norm(x[:, 0]))


def step_flops(shape: TransformerShape, n_matmul: int, batch: int, keys: int) -> int:
    """``benchmarks/generation.py``'s count for one decode step of ``batch`` rows."""
    return batch * (2 * n_matmul + 4 * shape.n_layer * shape.d_model * keys)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--prompt-len", type=int, default=150)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 64, 512])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing window per config")
    parser.add_argument("--check-steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = TransformerShape.from_config(ModelConfig(preset=args.preset), VOCAB.size)
    model = build_model(shape, torch.device("cpu"), args.seed)
    n_matmul = model.num_parameters(exclude_embeddings=True)
    peak = matmul_peak_flops("cpu")
    length = args.prompt_len + args.check_steps
    first_image = VOCAB.image_offset
    results, agreement = {}, {}
    for batch in args.batches:
        generator = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(
            VOCAB.text_offset, first_image, (batch, args.prompt_len), generator=generator
        )
        cache = model.new_cache(batch, length)
        model(prompt, kv_cache=cache)  # the prefill
        token = torch.full((batch, 1), first_image + 5)
        past = cache.length

        def eager(cache=cache, token=token, past=past):
            cache.length = past  # the same step again: overwrite slot `past`
            cache.next_position.fill_(past)
            model(token, kv_cache=cache)

        static = StaticDecoder(model, batch, length)
        static.load(cache, past)
        ids = token[:, 0]
        position = torch.full((batch,), past)
        cell = torch.ones(batch, dtype=torch.long)
        slot = torch.tensor([past])
        compiled = torch.compile(static.step, dynamic=False, fullgraph=True)
        tick = time.perf_counter()
        compiled(ids, position, cell, slot)
        compile_seconds = time.perf_counter() - tick
        configs = {
            "eager": eager,
            "static_eager": lambda s=static, a=(ids, position, cell, slot): s.step(*a),
            "static_compiled": lambda f=compiled, a=(ids, position, cell, slot): f(*a),
        }
        row = {}
        for name, fn in configs.items():
            seconds = timed(fn, args.seconds)
            flops = step_flops(shape, n_matmul, batch, past + 1)  # the filled keys, both ways
            row[name] = {
                "ms_per_step": 1000 * seconds,
                "tokens_per_second": batch / seconds,
                "achieved_flops": flops / seconds,
                "peak_fraction": flops / seconds / peak["peak_flops"],
            }
        row["static_compiled"]["compile_seconds"] = compile_seconds
        row["compiled_over_eager"] = (
            row["eager"]["ms_per_step"] / row["static_compiled"]["ms_per_step"]
        )
        results[str(batch)] = row

        # agreement: greedy image steps from the same prefill, eager library vs compiled static
        cache = model.new_cache(batch, length)
        start = model(prompt, kv_cache=cache)[:, -1]
        static.load(cache, cache.length)
        image = slice(first_image, VOCAB.size)
        eager_token = start[:, image].argmax(-1) + first_image
        static_token = eager_token.clone()
        worst, first_diff, rows_diff = 0.0, None, torch.zeros(batch, dtype=torch.bool)
        for j in range(args.check_steps - 1):
            eager_logits = model(eager_token[:, None], kv_cache=cache)[:, -1]
            static_logits = compiled(
                static_token,
                torch.full((batch,), args.prompt_len + j),
                torch.full((batch,), j + 1),
                torch.tensor([args.prompt_len + j]),
            )
            same_history = ~rows_diff  # rows fed the same tokens at every step so far
            if bool(same_history.any()):
                gap = (eager_logits - static_logits)[same_history].abs().max()
                worst = max(worst, float(gap))
            eager_token = eager_logits[:, image].argmax(-1) + first_image
            static_token = static_logits[:, image].argmax(-1) + first_image
            differ = eager_token != static_token
            if bool(differ.any()) and first_diff is None:
                first_diff = j + 1
            rows_diff |= differ
        agreement[str(batch)] = {
            "max_abs_logit_difference": worst,
            "rows_with_a_different_token": int(rows_diff.sum()),
            "first_step_differing": first_diff,
            "steps": args.check_steps,
        }
        print(
            f"batch {batch:4d}: eager {row['eager']['ms_per_step']:.2f} ms "
            f"({100 * row['eager']['peak_fraction']:.1f}% of peak), static eager "
            f"{row['static_eager']['ms_per_step']:.2f} ms, compiled "
            f"{row['static_compiled']['ms_per_step']:.2f} ms "
            f"({100 * row['static_compiled']['peak_fraction']:.1f}% of peak; compile "
            f"{compile_seconds:.0f} s): {row['compiled_over_eager']:.2f}x; greedy rows differing "
            f"{agreement[str(batch)]['rows_with_a_different_token']}/{batch}, max logit "
            f"difference {worst:.1e}",
            flush=True,
        )
    print(f"matmul peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s (fp32, n={peak['at_size']})")
    path = save_result(
        "decode_step_cpu",
        {
            "benchmark": "decode_step",
            "args": vars(args),
            "machine": describe_machine(),
            "matmul_peak": peak,
            "model": {**shape.to_dict(), "matmul_parameters": n_matmul},
            "flops_formula": "per step: batch * (2 N + 4 n_layer d_model C), C = keys attended",
            "results": results,
            "agreement": agreement,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
