"""DVC stage `sft`: multi-task instruction tuning of the pretrained model through DeepSpeed.

Reads the pretrained model (`--pretrain`), the tokens (`--tokens`) and the text tokenizer
(`--text-tokenizer`), params `base.seed` and `sft`. Exports the fine-tuned model (`--out`),
writes final metrics — per-task val loss of the pretrained and the fine-tuned model —
(`--metrics`) and dvclive curves (`--live`, rank 0). Checkpoints: `--scratch/<run key>`.
Launch like `pretrain` for several processes (`torchrun --nproc_per_node N stages/sft.py ...`).
"""

import argparse
import json
import os
import sys
import time

from cm3leon.artifacts import atomic_write_json
from cm3leon.config import ConfigError, load_params
from cm3leon.sft.finetuning import finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name in ("pretrain", "tokens", "text-tokenizer", "out", "metrics", "live", "scratch"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
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
        facts = finetune(
            args.pretrain,
            args.tokens,
            args.text_tokenizer,
            params.sft,
            params.base.seed,
            args.out,
            args.scratch,
            log,
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"sft: error: {err}", file=sys.stderr)
        return 1
    finally:
        if live is not None:
            live.end()
    if rank == 0:
        metrics = {
            **final,
            "examples": facts["examples"],
            "stage_seconds": round(time.perf_counter() - start, 1),
        }
        atomic_write_json(args.metrics, metrics)
        print(f"sft: {json.dumps(metrics, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
