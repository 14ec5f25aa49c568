"""``cm3leon generate | caption | ask | edit``: the trained model from the command line.

Each command loads a model folder (default ``models/sft`` of the project), the tokenizers and
the memory bank from the project's artifacts, runs one task and prints what it made together
with the memory-bank documents it retrieved (id, score, caption). Image outputs are written as
PNG with a provenance sidecar ``<output>.json`` (model fingerprint, prompt, strategy, seed,
retrieved documents) that ``cm3leon lineage`` can follow. Input images of any size or mode are
converted to RGB and resized/center-cropped to the tokenizer's size; unreadable files are an
error naming the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cm3leon.artifacts import atomic_write_json, image_grid, write_png
from cm3leon.data.importers import ImageError, load_image
from cm3leon.decoding.multimodal import Generation, MultimodalModel, TaskInput
from cm3leon.decoding.selector import STRATEGIES, Strategy, sample_plan

# Artifact paths inside a project (as dvc.yaml writes them).
DEFAULTS = {
    "vq": "models/vq",
    "text_tokenizer": "models/text_tokenizer",
    "tokens": "data/tokens",
    "retriever": "models/retriever",
    "retrieval": "data/retrieval",
}


def add_commands(sub) -> None:
    """Register the model commands on the ``cm3leon`` sub-parser."""
    generate = sub.add_parser("generate", help="text -> image")
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", required=True, help="PNG to write")
    _decoding_options(generate, strategy="top_p", cfg=1.0, samples=4)
    caption = sub.add_parser("caption", help="image -> caption")
    caption.add_argument("image")
    _decoding_options(caption, strategy="greedy", cfg=1.0, samples=1)
    ask = sub.add_parser("ask", help="image + question -> answer")
    ask.add_argument("image")
    ask.add_argument("question")
    _decoding_options(ask, strategy="greedy", cfg=1.0, samples=1)
    edit = sub.add_parser("edit", help="image + instruction -> edited image")
    edit.add_argument("image")
    edit.add_argument("instruction")
    edit.add_argument("-o", "--output", required=True, help="PNG to write")
    _decoding_options(edit, strategy="greedy", cfg=1.0, samples=1)


def _decoding_options(parser, strategy: str, cfg: float, samples: int) -> None:
    parser.add_argument("--model", default="models/sft", help="exported model folder")
    parser.add_argument("--strategy", default=strategy, choices=[*STRATEGIES, "mix"])
    parser.add_argument("--cfg", type=float, default=cfg, help="classifier-free guidance weight")
    parser.add_argument("--samples", type=int, default=samples, help="samples (re-ranked)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--retrieved", type=int, default=2, help="memory-bank documents to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_command(args: argparse.Namespace, project: Path) -> int:
    paths = {k: project / v for k, v in DEFAULTS.items()}
    model_dir = Path(args.model) if Path(args.model).is_absolute() else project / args.model
    use_bank = args.retrieved > 0 or (args.samples > 1 and args.command == "generate")
    try:
        model = MultimodalModel.load(
            model_dir,
            paths["vq"],
            paths["text_tokenizer"],
            paths["tokens"],
            paths["retriever"] if use_bank else None,
            paths["retrieval"] if use_bank else None,
        )
        plan = _plan(args)
        if args.command == "generate":
            item = TaskInput(texts={"caption": args.prompt})
            task = "text_to_image"
        else:
            try:
                pixels = load_image(args.image, model.image_size)
            except ImageError as err:
                raise ImageError(f"{args.image}: {err}") from None
            image = model.encode_pixels(pixels[None])[0]
            texts = {"question": args.question} if args.command == "ask" else {}
            if args.command == "edit":
                texts = {"instruction": args.instruction}
            task = {"caption": "captioning", "ask": "vqa", "edit": "editing"}[args.command]
            item = TaskInput(texts=texts, images={"image": image}, pixels=pixels)
        (result,) = model.run(task, [item], plan, args.retrieved, args.seed)
    except (ImageError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"cm3leon {args.command}: error: {err}") from None
    report = _report(args, model, model_dir, task, result)
    if result.codes is not None:
        images = model.decode_ids([model.vocab.image_to_vocab(result.codes)])
        write_png(args.output, images[0])
        atomic_write_json(f"{args.output}.json", report)
        if len(result.sample_codes) > 1:
            every = model.decode_ids([model.vocab.image_to_vocab(c) for c in result.sample_codes])
            sheet = Path(args.output).with_suffix(".samples.png")
            write_png(sheet, image_grid([np.asarray(every)], scale=4))
            report["samples_sheet"] = str(sheet)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def _plan(args) -> list[Strategy]:
    settings = {"cfg_weight": args.cfg, "temperature": args.temperature, "top_p": args.top_p}
    return sample_plan(args.strategy, args.samples, **settings)


def _report(args, model, model_dir: Path, task: str, result: Generation) -> dict:
    report = {
        "task": task,
        "model": str(model_dir),
        "model_fingerprint": model.fingerprint,
        "input": {
            k: getattr(args, k)
            for k in ("prompt", "image", "question", "instruction")
            if hasattr(args, k)
        },
        "strategies": result.strategies,
        "cfg_weight": args.cfg,
        "seed": args.seed,
        "retrieved": [d.provenance() for d in result.retrieved],
        "best_sample": result.best,
        "rerank_scores": result.rerank_scores,
    }
    if result.text is not None:
        report["output"] = result.text
    else:
        report["output"] = str(args.output)
    return report


def _print(report: dict) -> None:
    strategies = ", ".join(report["strategies"])
    print(f"{report['task']} with {report['model']} ({strategies}, cfg {report['cfg_weight']})")
    if report["retrieved"]:
        print("retrieved from the memory bank:")
        for d in report["retrieved"]:
            print(f"  {d['id']}  score {d['score']:.3f}  {d['caption']}")
    else:
        print("retrieved from the memory bank: none (--retrieved 0)")
    print(f"output: {report['output']}")
