"""DVC stage `pretrain`: retrieval-augmented CM3 pretraining through DeepSpeed.

Reads the tokens (`--tokens`) and the memory bank's neighbor table (`--retrieval`), params
`base.seed` and `pretrain`. Exports the model folder (`--out`), writes final metrics
(`--metrics`) and dvclive curves (`--live`, rank 0 only). Resumable checkpoints go to
`--scratch/<run key>` (untracked). Runs single-process as is, or under a launcher:

    torchrun --nproc_per_node 2 stages/pretrain.py <same arguments>
    deepspeed --hostfile hosts stages/pretrain.py <same arguments>

`--no-retrieval` trains the baseline of the retrieval study at equal compute: the same params
with `retrieval_k_max` forced to 0 and the steps raised until it sees as many training tokens
(stage `pretrain_no_retrieval`; `equal_compute_baseline`).
"""

import argparse
import os
import sys

from stage_runtime import StageRun, run_stage

from cm3leon.config import load_params
from cm3leon.training.pretraining import equal_compute_baseline, pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name in ("tokens", "retrieval", "out", "metrics", "live", "scratch"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--no-retrieval", action="store_true", help="train without neighbors")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args(argv)

    def work(run: StageRun) -> dict[str, float]:
        params = load_params(args.params)
        config = params.pretrain
        if args.no_retrieval:
            world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / deepspeed
            config = equal_compute_baseline(
                args.tokens, args.retrieval, config, params.base.seed, world
            )
            print(
                f"pretrain: no-retrieval baseline, {config.train.steps} steps of "
                f"{config.train.micro_batch_size} documents per process",
                flush=True,
            )
        facts = pretrain(
            args.tokens,
            args.retrieval,
            config,
            params.base.seed,
            args.out,
            args.scratch,
            run.log,
            code=(__file__,),
        )
        return {**run.final, "parameters": facts["parameters"]}

    return run_stage("pretrain", work, live=args.live, metrics=args.metrics)


if __name__ == "__main__":
    sys.exit(main())
