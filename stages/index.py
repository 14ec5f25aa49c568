"""DVC stage `index`: dual-encoder retriever, faiss memory bank and neighbor table.

Reads the corpus (`--corpus`, with its scene judge when it has one) and tokens (`--tokens`),
params `base.seed`, `data.image_size` and `index`. Writes the retriever (`--retriever-out`), the
memory bank with every train/val document's neighbors (`--retrieval-out`), retrieval metrics
(`--metrics`) and the retriever's training curve with dvclive (`--live`). Embedding runs on the
shard runner the `CM3LEON_SHARD_*` variables choose: serially in this process by default, any
other runner through `flows/shards.py` (imported only then), with identical outputs on every
runner (`stages/shard_runner.py`).
"""

import argparse
import sys

from shard_runner import run_on_shard_runner
from stage_runtime import StageRun, run_stage

from cm3leon.config import load_params
from cm3leon.data.scene_judge import load_judge
from cm3leon.retrieval.memory_bank import build_memory_bank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name in ("corpus", "tokens", "retriever-out", "retrieval-out", "metrics", "live"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args(argv)

    def work(run: StageRun) -> dict[str, float]:
        params = load_params(args.params)
        return run_on_shard_runner(
            run.stage,
            "embedding documents",
            lambda executor: build_memory_bank(
                args.corpus,
                args.tokens,
                params.data,
                params.index,
                params.base.seed,
                args.retriever_out,
                args.retrieval_out,
                on_log=run.log,
                executor=executor,
                judge=load_judge(args.corpus),
            ),
        )

    return run_stage("index", work, live=args.live, log_prefix="retriever/", metrics=args.metrics)


if __name__ == "__main__":
    sys.exit(main())
