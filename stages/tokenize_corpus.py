"""DVC stage `tokenize`: VQ image tokenizer, BPE text tokenizer, Vocab and the tokens artifact.

(The file is not called `tokenize.py`: stage scripts run with `stages/` first on `sys.path`,
where that name would shadow the standard library's `tokenize` module.)

Reads the corpus (`--corpus`) after the validation gate passed (`--validation`), params `base.seed`,
`data` and `tokenize`. Writes the VQ tokenizer (`--vq-out`), the text tokenizer (`--text-out`),
the tokens (`--tokens-out`), metrics (`--metrics`), the reconstruction grid (`--grid`: val
originals above their reconstructions) and the VQ training curve with dvclive (`--live`).
Image encoding runs on the executor the `CM3LEON_SHARD_*` variables choose (`flows/shards.py`;
serial by default), with identical outputs on every executor.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from dvclive import Live

from cm3leon.artifacts import atomic_write_json, image_grid, write_png
from cm3leon.config import ConfigError, load_params
from cm3leon.data.corpus import CorpusError
from cm3leon.tokenizers.corpus_tokenization import tokenize_corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for flows/
from flows.shards import ShardSettings, run_sharded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name in (
        "corpus",
        "validation",
        "vq-out",
        "text-out",
        "tokens-out",
        "metrics",
        "grid",
        "live",
    ):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        shards = ShardSettings.from_env()
        print(f"tokenize: encoding images on the {shards.runner} shard runner")
        gate = json.loads(Path(args.validation).read_text(encoding="utf-8"))
        if not gate.get("success"):
            raise CorpusError(f"{args.validation} says the corpus failed validation; fix it first")
        start = time.perf_counter()
        with Live(dir=args.live, save_dvc_exp=False, dvcyaml=None, report=None) as live:

            def log(step: int, metrics: dict[str, float]) -> None:
                live.step = step
                for key, value in metrics.items():
                    live.log_metric(f"vq/{key}", value)
                live.next_step()

            result = run_sharded(
                "tokenize",
                lambda executor: tokenize_corpus(
                    args.corpus,
                    params.data,
                    params.tokenize,
                    params.base.seed,
                    args.vq_out,
                    args.text_out,
                    args.tokens_out,
                    on_log=log,
                    executor=executor,
                ),
                shards,
            )
    except (ConfigError, CorpusError, ValueError, FileNotFoundError) as err:
        print(f"tokenize: error: {err}", file=sys.stderr)
        return 1
    metrics = {**result.metrics, "stage_seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(args.metrics, metrics)
    write_png(args.grid, image_grid([result.originals, result.reconstructions], scale=4))
    print(f"tokenize: {json.dumps(metrics, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
