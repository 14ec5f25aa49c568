"""DVC stage `sft`: multi-task instruction tuning of the pretrained model through DeepSpeed.

Reads the pretrained model (`--pretrain`), the tokens (`--tokens`) and the text tokenizer
(`--text-tokenizer`), params `base.seed` and `sft`. Exports the fine-tuned model (`--out`),
writes final metrics — per-task val loss of the pretrained and the fine-tuned model —
(`--metrics`) and dvclive curves (`--live`, rank 0). Checkpoints: `--scratch/<run key>`.
Launch like `pretrain` for several processes (`torchrun --nproc_per_node N stages/sft.py ...`).
"""

import argparse
import sys

from stage_runtime import StageRun, run_stage

from cm3leon.config import load_params
from cm3leon.sft.finetuning import finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name in ("pretrain", "tokens", "text-tokenizer", "out", "metrics", "live", "scratch"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    def work(run: StageRun) -> dict[str, float]:
        params = load_params(args.params)
        facts = finetune(
            args.pretrain,
            args.tokens,
            args.text_tokenizer,
            params.sft,
            params.base.seed,
            args.out,
            args.scratch,
            run.log,
            code=(__file__,),
        )
        return {
            **run.final,
            "examples": facts["examples"],
            "tasks_not_trained": facts["tasks_not_trained"],
        }

    return run_stage("sft", work, live=args.live, metrics=args.metrics)


if __name__ == "__main__":
    sys.exit(main())
