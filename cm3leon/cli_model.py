"""``cm3leon generate | caption | ask | edit``: the trained model from the command line.

Each command loads a model folder (default: the SFT model), the tokenizers and the memory bank
from the project's artifacts — their paths read from the ``evaluate`` stage's command in
``dvc.yaml`` (:mod:`cm3leon.project`), its decoding defaults from ``params.yaml`` — runs one
task and prints what it made together with the memory-bank documents it retrieved (id, score,
caption). Image outputs are written as
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
from cm3leon.config import DecodingConfig, EvaluateConfig, load_params
from cm3leon.data.importers import ImageError, load_image
from cm3leon.decoding.selector import Strategy, sample_plan
from cm3leon.decoding_strategies import SAMPLE_PLANS
from cm3leon.evaluation.tasks import task_plan
from cm3leon.inference.multimodal import Generation, MultimodalModel, TaskInput
from cm3leon.project import stage_arguments
from cm3leon.tasks import task as task_spec

# The model commands' task, and whether it has a single right output (one answer sample).
COMMANDS = {
    "generate": ("text_to_image", False),
    "caption": ("captioning", True),
    "ask": ("vqa", True),
    "edit": ("editing", True),
}


def add_commands(sub) -> None:
    """Register the model commands on the ``cm3leon`` sub-parser."""
    generate = sub.add_parser("generate", help="text -> image")
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", required=True, help="PNG to write")
    _decoding_options(generate)
    caption = sub.add_parser("caption", help="image -> caption")
    caption.add_argument("image")
    _decoding_options(caption)
    ask = sub.add_parser("ask", help="image + question -> answer")
    ask.add_argument("image")
    ask.add_argument("question")
    _decoding_options(ask)
    edit = sub.add_parser("edit", help="image + instruction -> edited image")
    edit.add_argument("image")
    edit.add_argument("instruction")
    edit.add_argument("-o", "--output", required=True, help="PNG to write")
    _decoding_options(edit)


def _decoding_options(parser) -> None:
    """Options left unset take the project's ``evaluate`` params (``params.yaml``), the way the
    evaluate stage prompts: text-to-image the headline plan (``evaluate.decoding.strategy``,
    ``samples``, ``cfg_weight``), the other commands one ``answer_strategy`` sample (``edit``
    guided at ``answer_cfg_weight``, ``caption`` and ``ask`` unguided);
    ``evaluate.retrieved`` memory-bank documents."""
    parser.add_argument("--model", default=None, help="model folder (default: the SFT model)")
    parser.add_argument("--strategy", default=None, choices=list(SAMPLE_PLANS))
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance weight")
    parser.add_argument("--samples", type=int, default=None, help="samples (re-ranked)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--cd-alpha", type=float, default=None, help="CD-K head threshold")
    parser.add_argument("--cd-k", type=int, default=None, help="CD-K: the k-th largest p_cond")
    parser.add_argument("--retrieved", type=int, default=None, help="memory-bank documents")
    parser.add_argument(
        "--rerank-caption-weight",
        type=float,
        default=None,
        help="re-rank samples by the dual encoder + this weight x log p(prompt | sample) under "
        "the SFT model (0: dual encoder alone)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_command(args: argparse.Namespace, project: Path) -> int:
    task, single_answer = COMMANDS[args.command]
    try:
        paths = {k: project / v for k, v in stage_arguments(project, "evaluate").items()}
        config = _evaluate_config(project)
        model_dir = paths["sft"] if args.model is None else project / args.model
        plan, cfg_weight = _plan(args, config.decoding, task, single_answer)
        if args.retrieved is None:
            args.retrieved = config.retrieved
        use_bank = args.retrieved > 0 or (len(plan) > 1 and not single_answer)  # or re-rank
        model = MultimodalModel.load(
            model_dir,
            paths["vq"],
            paths["text-tokenizer"],
            paths["tokens"],
            paths["retriever"] if use_bank else None,
            paths["retrieval"] if use_bank else None,
            phrasing=config.phrasing,
            max_text_tokens=config.max_text_tokens,
        )
        captioner = None
        if use_bank and not single_answer and len(plan) > 1:  # re-ranked as the evaluate stage
            weight = args.rerank_caption_weight
            if weight is None:
                weight = config.decoding.rerank_caption_weight
            if weight > 0:
                captioner = model
                if model_dir.resolve() != paths["sft"].resolve():
                    captioner = MultimodalModel.load(
                        paths["sft"],
                        paths["vq"],
                        paths["text-tokenizer"],
                        paths["tokens"],
                        phrasing=config.phrasing,
                    )
            model.rerank_with(captioner, weight)
        if args.command == "generate":
            item = TaskInput(texts={"caption": args.prompt})
        else:
            try:
                pixels = load_image(args.image, model.image_size)
            except ImageError as err:
                raise ImageError(f"{args.image}: {err}") from None
            image = model.encode_pixels(pixels[None])[0]
            texts = {"question": args.question} if args.command == "ask" else {}
            if args.command == "edit":
                texts = {"instruction": args.instruction}
            item = TaskInput(texts=texts, images={"image": image}, pixels=pixels)
        (result,) = model.run(task, [item], plan, args.retrieved, args.seed)
    except (ImageError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"cm3leon {args.command}: error: {err}") from None
    report = _report(args, model, model_dir, task, result, cfg_weight)
    if result.rerank_scores:
        report["rerank"] = {
            "captioner": None if captioner is None else str(paths["sft"]),
            "caption_weight": model.caption_weight,
        }
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


def _evaluate_config(project: Path) -> EvaluateConfig:
    params = project / "params.yaml"
    return load_params(params).evaluate if params.is_file() else EvaluateConfig()


def _plan(
    args, decoding: DecodingConfig, task: str, single_answer: bool
) -> tuple[list[Strategy], float]:
    """The sample plan from the options, each unset one from ``decoding`` (ConfigError, a
    ValueError, names a bad value); with none set, the evaluate stage's plan for ``task``."""
    options = ("strategy", "samples", "cfg", "temperature", "top_p", "cd_alpha", "cd_k")
    stage_plan = task_plan(decoding, task_spec(task))
    stage_cfg = stage_plan[0].settings.cfg_weight
    if all(getattr(args, k) is None for k in options):
        return stage_plan, stage_cfg  # exactly as the evaluate stage decodes the task
    if single_answer:  # one answer sample, guided as the stage guides the task
        plan, samples, cfg = decoding.answer_strategy, 1, stage_cfg
    else:
        plan, samples, cfg = decoding.strategy, decoding.samples, decoding.cfg_weight
    overrides = {
        key: value
        for key, value in {
            "cfg_weight": args.cfg if args.cfg is not None else cfg,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "cd_alpha": args.cd_alpha,
            "cd_k": args.cd_k,
        }.items()
        if value is not None
    }
    samples = args.samples if args.samples is not None else samples
    strategies = sample_plan(decoding, args.strategy or plan, samples, **overrides)
    return strategies, overrides["cfg_weight"]


def _report(args, model, model_dir: Path, task: str, result: Generation, cfg: float) -> dict:
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
        "cfg_weight": cfg,
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
