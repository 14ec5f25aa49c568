"""DVC stage `evaluate`: pretrain, SFT and no-retrieval models on the test split.

Reads the models (`--pretrain`, `--sft`, optional `--no-retrieval`), the VQ and text tokenizers,
the tokens, the corpus (pixels for FID and mask targets; its scene judge, when it has one, for
the exact metrics) and the memory bank (`--retriever`, `--retrieval`); params `base.seed` and
`evaluate`. Image samples are re-ranked by the dual encoder with the SFT model's caption
likelihood added (`evaluate.decoding.rerank_caption_weight`), for every generator alike.
Writes the folder `--out`
(predictions, generations, tables, plots, grids; see `cm3leon.evaluation.evaluate`) and the
metrics file (`--metrics`: `<out>/metrics.json` plus the stage's wall time, kept out of the DVC
cache; the folder itself holds no clock time, so the same seed gives the same bytes).
"""

import argparse
import sys

import torch
from stage_runtime import StageRun, run_stage

from cm3leon.config import load_params
from cm3leon.evaluation.evaluate import evaluate
from cm3leon.inference.multimodal import MultimodalModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name in ("pretrain", "sft", "vq", "text-tokenizer", "tokens", "corpus", "retriever"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("retrieval", "out", "metrics"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--no-retrieval", default=None, help="the no-retrieval pretrained model")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    args = parser.parse_args(argv)

    def work(run: StageRun) -> None:
        params = load_params(args.params)
        config = params.evaluate
        torch.manual_seed(params.base.seed)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        folders = {"pretrain": args.pretrain, "sft": args.sft}
        if args.no_retrieval:
            folders["pretrain_no_retrieval"] = args.no_retrieval
        models = {
            name: MultimodalModel.load(
                folder,
                args.vq,
                args.text_tokenizer,
                args.tokens,
                args.retriever,
                args.retrieval,
                phrasing=config.phrasing,
                batch_size=config.batch_size,
                max_text_tokens=config.max_text_tokens,
                device=device,
            )
            for name, folder in folders.items()
        }
        # Every generator's image samples are re-ranked with the SFT model as the captioner
        # (evaluate.decoding.rerank_caption_weight), so models and study cells differ only by
        # their samples, never by their re-ranker.
        for model in models.values():
            model.rerank_with(models["sft"], config.decoding.rerank_caption_weight)
        metrics = evaluate(
            models,
            args.corpus,
            args.tokens,
            config,
            params.base.seed,
            args.out,
            log=lambda line: print(f"evaluate: {line}", flush=True),
        )
        # Not run_stage(metrics=...), which echoes every metric: evaluate prints its headline.
        written = run.write_metrics(args.metrics, metrics)
        best, seconds = metrics["best_text_to_image"], written["stage_seconds"]
        print(f"evaluate: best text-to-image {best} in {seconds:.0f}s")

    return run_stage("evaluate", work)


if __name__ == "__main__":
    sys.exit(main())
