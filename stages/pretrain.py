"""DVC stage `pretrain`: retrieval-augmented CM3 pretraining through DeepSpeed.

Reads the tokens (`--tokens`) and the memory bank's neighbor table (`--retrieval`), params
`base.seed` and `pretrain`. Exports the model folder (`--out`), writes final metrics
(`--metrics`) and dvclive curves (`--live`, rank 0 only). Resumable checkpoints go to
`--scratch/<run key>` (untracked). Runs single-process as is, or under a launcher:

    torchrun --nproc_per_node 2 stages/pretrain.py <same arguments>
    deepspeed --hostfile hosts stages/pretrain.py <same arguments>

`--no-retrieval` trains the baseline of the retrieval study: the same params with
`retrieval_k_max` forced to 0 (stage `pretrain_no_retrieval`; equal steps and query documents,
fewer tokens per step).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

from cm3leon.artifacts import atomic_write_json
from cm3leon.config import ConfigError, load_params
from cm3leon.training.pretraining import pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name in ("tokens", "retrieval", "out", "metrics", "live", "scratch"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--no-retrieval", action="store_true", help="train without neighbors")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    start = time.perf_counter()
    final: dict[str, float] = {}
    live = None
    if rank == 0:
        from dvclive import Live

        live = Live(dir=args.live, save_dvc_exp=False, dvcyaml=None, report=None)

    def log(step: int, metrics: dict[str, float]) -> None:
        live.step = step
        for key, value in metrics.items():
            live.log_metric(key, value)
            final[key] = value
        live.next_step()

    try:
        params = load_params(args.params)
        config = params.pretrain
        if args.no_retrieval:
            config = dataclasses.replace(config, retrieval_k_max=0)
        facts = pretrain(
            args.tokens,
            args.retrieval,
            config,
            params.base.seed,
            args.out,
            args.scratch,
            log,
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"pretrain: error: {err}", file=sys.stderr)
        return 1
    finally:
        if live is not None:
            live.end()
    if rank == 0:
        metrics = {
            **final,
            "parameters": facts["parameters"],
            "stage_seconds": round(time.perf_counter() - start, 1),
        }
        atomic_write_json(args.metrics, metrics)
        print(f"pretrain: {json.dumps(metrics, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
