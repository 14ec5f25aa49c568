"""What the reproducible numeric mode costs, and what it buys (issue: same bytes on any machine).

Runs the same training work in fresh processes under four kernel settings and reports, for each,
the throughput and the sha256 of the trained weights:

* ``fast``: every library's own choice on this CPU (``base.numerics.mode: fast``);
* ``reproducible``: the pins of :mod:`cm3leon.numerics` (AVX2 paths, fixed threads);
* ``fast, other CPU``: the fast mode with the kernels another CPU would give it (ATen's
  generic kernels, oneDNN capped at SSE4.1, MKL's vendor-neutral path), set as variables;
* ``reproducible, other CPU``: the same variables, then the reproducible mode's pins, applied
  the way a stage applies them (:func:`cm3leon.numerics.pin_process`).

The work: steps of the pretraining transformer (the ``default`` preset with the CPU run's 8
heads, synthetic batch, AdamW + clipping), of the ``tiny`` preset (the hash a second machine
compares), and of the VQ tokenizer's real training function (``train_vq``, convolutions).
Verdicts: the reproducible mode's throughput over the fast mode's (per work), and whether the
other CPU's kernels change the fast mode's weights but not the reproducible mode's.

    python benchmarks/numerics.py [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cm3leon.numerics import OTHER_CPU_KERNELS as OTHER_CPU

SETTINGS = {
    "fast": ("fast", {}),
    "reproducible": ("reproducible", {}),
    "fast_other_cpu": ("fast", OTHER_CPU),
    "reproducible_other_cpu": ("reproducible", OTHER_CPU),
}


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def worker(mode: str, threads: int, steps: int) -> dict:
    """The measurements of one process (pinned first, as a stage is)."""
    from cm3leon import numerics

    numerics.pin_process(mode, threads)
    import numpy as np
    import torch
    from train_throughput import plain_step_fn, synthetic_batch

    from cm3leon.config import ModelConfig, TrainConfig, VQConfig, VQTrainConfig
    from cm3leon.model.transformer import DecoderLM, TransformerShape
    from cm3leon.tokenizers.vq_training import train_vq

    if mode == "fast":
        torch.set_num_threads(threads)  # equal threads: the comparison is of kernels only
    result = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "numerics": numerics.record(),
    }
    device = torch.device("cpu")
    for preset, n_head, batch_size, seq_len in (("default", 8, 16, 256), ("tiny", None, 4, 64)):
        shape = TransformerShape.from_config(ModelConfig(preset=preset, n_head=n_head), 800)
        torch.manual_seed(0)
        model = DecoderLM(shape)
        batch = synthetic_batch(batch_size, seq_len, 800, device)
        _, step = plain_step_fn(model, TrainConfig(steps=10**6), batch, device, False, False)
        step()  # warm-up, not timed (but trained: every setting does it)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - start
        result[f"pretrain_{preset}"] = {
            "tokens_per_second": steps * batch_size * seq_len / seconds,
            "weights_sha256": weights_digest(model),
        }
    images = np.random.default_rng(0).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    vq_steps = steps * 2
    start = time.perf_counter()
    vq = train_vq(images, VQConfig(), VQTrainConfig(steps=vq_steps, batch_size=32), seed=0)
    seconds = time.perf_counter() - start
    result["vq"] = {
        "images_per_second": vq_steps * 32 / seconds,
        "weights_sha256": weights_digest(vq),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per work")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every setting, rotated")
    parser.add_argument("--worker", choices=("fast", "reproducible"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args.threads, args.steps)))
        return

    from machine import describe_machine, save_result

    from cm3leon import numerics

    base_env = {k: v for k, v in os.environ.items() if k not in numerics.KERNEL_VARIABLES}
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"numerics-{os.getpid()}.json"
    for round_ in range(args.rounds):
        names = list(SETTINGS)
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            mode, extra = SETTINGS[name]
            cmd = [sys.executable, __file__, "--worker", mode, "--out", str(out)]
            cmd += ["--threads", str(args.threads), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, env={**base_env, **extra}, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr}")
            runs[name].append(json.loads(out.read_text()))
            r = runs[name][-1]
            print(
                f"round {round_ + 1}/{args.rounds} {name:24s} {r['cpu_capability']:8s} "
                f"pretrain {r['pretrain_default']['tokens_per_second']:8.0f} tok/s, "
                f"VQ {r['vq']['images_per_second']:6.0f} img/s, "
                f"weights {r['pretrain_default']['weights_sha256'][:10]} "
                f"{r['pretrain_tiny']['weights_sha256'][:10]} {r['vq']['weights_sha256'][:10]}",
                flush=True,
            )
    out.unlink(missing_ok=True)

    works = ("pretrain_default", "pretrain_tiny", "vq")
    rate = {"pretrain_default": "tokens_per_second", "pretrain_tiny": "tokens_per_second"}

    def best(name: str, work: str) -> float:
        return max(r[work][rate.get(work, "images_per_second")] for r in runs[name])

    def digests(name: str, work: str) -> set[str]:
        return {r[work]["weights_sha256"] for r in runs[name]}

    verdicts = {}
    for work in works:
        verdicts[work] = {
            "reproducible_over_fast_throughput": best("reproducible", work) / best("fast", work),
            "same_bytes_every_round": all(len(digests(name, work)) == 1 for name in SETTINGS),
            "other_cpu_changes_fast_bytes": digests("fast", work)
            != digests("fast_other_cpu", work),
            "other_cpu_keeps_reproducible_bytes": digests("reproducible", work)
            == digests("reproducible_other_cpu", work),
            "reproducible_equals_fast_here": digests("reproducible", work) == digests("fast", work),
        }
    payload = {
        "benchmark": "numerics",
        "machine": describe_machine(),
        "config": {"threads": args.threads, "steps": args.steps, "rounds": args.rounds},
        "other_cpu_variables": OTHER_CPU,
        "pinned_variables": numerics.pinned_environment(args.threads),
        "runs": runs,
        "verdicts": verdicts,
    }
    path = save_result("numerics_cpu", payload)
    print(json.dumps(verdicts, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
