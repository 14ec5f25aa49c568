"""DVC stage `tokenize`: VQ image tokenizer, BPE text tokenizer, Vocab and the tokens artifact.

(The file is not called `tokenize.py`: stage scripts run with `stages/` first on `sys.path`,
where that name would shadow the standard library's `tokenize` module.)

Reads the corpus (`--corpus`, with its scene judge when it has one) after the validation gate
passed (`--validation`), params `base.seed`, `data.image_size` and `tokenize`. Writes the VQ
tokenizer (`--vq-out`), the text tokenizer (`--text-out`), the tokens (`--tokens-out`),
metrics (`--metrics`), the reconstruction grid (`--grid`: val originals above their
reconstructions) and the VQ training curve with dvclive (`--live`).
Image encoding runs on the shard runner the `CM3LEON_SHARD_*` variables choose: serially in this
process by default, any other runner through `flows/shards.py` (imported only then), with
identical outputs on every runner (`stages/shard_runner.py`).
"""

import argparse
import sys

from shard_runner import run_on_shard_runner
from stage_runtime import StageRun, run_stage

from cm3leon.artifacts import image_grid, write_png
from cm3leon.config import load_params
from cm3leon.data.scene_judge import load_judge
from cm3leon.data.validation import check_validated
from cm3leon.tokenizers.corpus_tokenization import tokenize_corpus


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

    def work(run: StageRun) -> dict[str, float]:
        params = load_params(args.params)
        check_validated(args.corpus, args.validation)
        result = run_on_shard_runner(
            run.stage,
            "encoding images",
            lambda executor: tokenize_corpus(
                args.corpus,
                params.data,
                params.tokenize,
                params.base.seed,
                args.vq_out,
                args.text_out,
                args.tokens_out,
                on_log=run.log,
                executor=executor,
                judge=load_judge(args.corpus),
            ),
        )
        write_png(args.grid, image_grid([result.originals, result.reconstructions], scale=4))
        return result.metrics

    return run_stage("tokenize", work, live=args.live, log_prefix="vq/", metrics=args.metrics)


if __name__ == "__main__":
    sys.exit(main())
