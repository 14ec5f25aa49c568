"""DVC stage `index`: dual-encoder retriever, faiss memory bank and neighbor table.

Reads the corpus (`--corpus`) and tokens (`--tokens`), params `base.seed`, `data.source`,
`data.image_size`, `data.shapeworld` and `index`. Writes the retriever (`--retriever-out`), the
memory bank with every train/val document's neighbors (`--retrieval-out`), retrieval metrics
(`--metrics`) and the retriever's training curve with dvclive (`--live`). Embedding runs on the
executor the `CM3LEON_SHARD_*` variables choose (`flows/shards.py`; serial by default), with
identical outputs on every executor.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from dvclive import Live

from cm3leon.artifacts import atomic_write_json
from cm3leon.config import ConfigError, load_params
from cm3leon.data.corpus import CorpusError
from cm3leon.retrieval.memory_bank import build_memory_bank

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for flows/
from flows.shards import ShardSettings, run_sharded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name in ("corpus", "tokens", "retriever-out", "retrieval-out", "metrics", "live"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        params = load_params(args.params)
        shards = ShardSettings.from_env()
        print(f"index: embedding documents on the {shards.runner} shard runner")
        with Live(dir=args.live, save_dvc_exp=False, dvcyaml=None, report=None) as live:

            def log(step: int, metrics: dict[str, float]) -> None:
                live.step = step
                for key, value in metrics.items():
                    live.log_metric(f"retriever/{key}", value)
                live.next_step()

            metrics = run_sharded(
                "index",
                lambda executor: build_memory_bank(
                    args.corpus,
                    args.tokens,
                    params.data,
                    params.index,
                    params.base.seed,
                    args.retriever_out,
                    args.retrieval_out,
                    on_log=log,
                    executor=executor,
                ),
                shards,
            )
    except (ConfigError, CorpusError, ValueError, FileNotFoundError) as err:
        print(f"index: error: {err}", file=sys.stderr)
        return 1
    metrics["stage_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.metrics, metrics)
    print(f"index: {json.dumps(metrics, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
