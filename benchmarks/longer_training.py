"""What more compute buys: pretrain + SFT with more steps and a bigger batch (issue: evaluate).

The default CPU run is step-bound (text-to-image quality keeps rising with steps). This harness
reruns the pipeline's own library calls — :func:`cm3leon.training.pretraining.pretrain` and
:func:`cm3leon.sft.finetuning.finetune` on the project's ``data/tokens`` and ``data/retrieval`` —
with ``--pretrain-steps``, ``--sft-steps`` and ``--micro-batch`` overriding ``params.yaml``, writes
the two model folders and a JSON-lines log of every metric, and leaves scoring to the evaluate
stage's script::

    python benchmarks/longer_training.py --out /tmp/long --pretrain-steps 6000 --sft-steps 3000 \\
        --micro-batch 32                       # about 4 minutes on one H200 (bf16)
    python stages/evaluate.py --pretrain /tmp/long/pretrain --sft /tmp/long/sft \\
        --vq models/vq --text-tokenizer models/text_tokenizer --tokens data/tokens \\
        --corpus data/corpus --retriever models/retriever --retrieval data/retrieval \\
        --out /tmp/long/eval --metrics /tmp/long/eval_metrics.json

``benchmarks/results/longer_training_h200.json`` holds one such run's settings, training curve
summary and evaluation tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from cm3leon.config import load_params
from cm3leon.sft.finetuning import finetune
from cm3leon.training.pretraining import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--pretrain-steps", type=int, default=6000)
    parser.add_argument("--sft-steps", type=int, default=3000)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--pretrain-warmup", type=int, default=200)  # SFT keeps its own
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = load_params(args.params)
    log = (out / "log.jsonl").open("a")

    def on_log(step: int, metrics: dict) -> None:
        numbers = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        log.write(json.dumps({"step": step, **numbers}) + "\n")
        log.flush()

    def longer(config, steps: int, warmup: int | None = None):
        train = dataclasses.replace(
            config.train,
            steps=steps,
            micro_batch_size=args.micro_batch,
            warmup_steps=config.train.warmup_steps if warmup is None else warmup,
            eval_every=max(steps // 4, 1),
            checkpoint_every=10**9,
            log_every=100,
        )
        return dataclasses.replace(config, train=train)

    start = time.perf_counter()
    pretrain(
        "data/tokens",
        "data/retrieval",
        longer(params.pretrain, args.pretrain_steps, args.pretrain_warmup),
        params.base.seed,
        out / "pretrain",
        out / "scratch_pretrain",
        on_log,
    )
    middle = time.perf_counter()
    finetune(
        out / "pretrain",
        "data/tokens",
        "models/text_tokenizer",
        longer(params.sft, args.sft_steps),
        params.base.seed,
        out / "sft",
        out / "scratch_sft",
        on_log,
    )
    end = time.perf_counter()
    print(f"pretrain {middle - start:.1f}s, sft {end - middle:.1f}s; models in {out}")


if __name__ == "__main__":
    main()
