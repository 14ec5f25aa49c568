"""The fast experiment loop of the quality work: pretrain with param overrides, score text-to-image.

Reruns the pretrain stage's library call on the tokens and neighbor table ``dvc.yaml`` names
with ``-S section.key=value`` overrides of ``params.yaml`` (the same spelling as
``dvc exp run -S``; values are YAML), then scores the model on the test split's text-to-image
prompts with the evaluate stage's own scorer (:func:`cm3leon.evaluation.tasks.score_task`), at
each ``--cfg`` weight. It prints and saves exact-scene accuracy with its 95% Wilson interval,
by object count, and the diagnostics of why samples are wrong (attribute accuracy, object
count accuracy, share of true objects drawn exactly, and — every sample judged — the share of
samples that are right and of prompts with a right one among them: the generator alone and a
perfect re-ranker, as in the evaluate stage's samples study)::

    python benchmarks/quality_loop.py --name default --cfg 1 --cfg 1.5
    python benchmarks/quality_loop.py --name no-cells -S pretrain.model.image_positions=false

Each run appends one JSON line (overrides, tokens seen, seconds, val losses, metrics) to
``--table`` (default ``benchmarks/results/quality_loop.jsonl``) and keeps its model under
``--work/<name>``. Compare runs at equal compute: the line records ``tokens_seen`` (weighted
training targets) and ``train_seconds``. ``--eval-only`` rescores a run's model (e.g. at another
``--retrieved`` or ``--samples``). A 300-step loop ranks nothing here (every run scores 0), so
runs use the default's full step count.

``--stage sft --base NAME`` instead fine-tunes run ``NAME``'s pretrained model (``--base`` may
also be a model folder, e.g. ``models/pretrain``) with the ``sft`` overrides and scores every
task of the registry as the evaluate stage does (``evaluate.task_examples`` rows each; text-to-
image with the same plan as above, the other tasks with ``evaluate.decoding.answer_strategy``)::

    python benchmarks/quality_loop.py --stage sft --base models/pretrain --name sft-3k \
        -S sft.train.steps=3000 --cfg 1.5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from machine import append_line, describe_machine

from cm3leon.config import EvaluateConfig, load_params
from cm3leon.data.scene_judge import SceneJudge, load_judge
from cm3leon.evaluation.studies import generator_columns
from cm3leon.evaluation.tasks import (
    TestSet,
    answer_strategy,
    load_test_set,
    sample_correctness,
    score_task,
    strategies,
    task_inputs,
)
from cm3leon.inference.multimodal import MultimodalModel
from cm3leon.project import stage_arguments
from cm3leon.sft.finetuning import finetune
from cm3leon.tasks import TASKS
from cm3leon.training.pretraining import pretrain


def load_scored_model(
    model_dir: str | Path, paths: dict[str, str], evaluate: EvaluateConfig, device: str
) -> MultimodalModel:
    """``model_dir`` loaded as the evaluate stage loads a model it scores: ``paths`` are the
    stage's artifact paths (:func:`cm3leon.project.stage_arguments`), the generation settings
    ``evaluate``'s. It re-ranks by the dual encoder alone (no captioner): the loop trains
    pretrained models without an SFT model of their own, and its rows since the start were
    scored so, which keeps them comparable (the stage adds the SFT model's caption
    likelihood: ``evaluate.decoding.rerank_caption_weight``)."""
    return MultimodalModel.load(
        model_dir,
        paths["vq"],
        paths["text-tokenizer"],
        paths["tokens"],
        paths["retriever"],
        paths["retrieval"],
        phrasing=evaluate.phrasing,
        batch_size=evaluate.batch_size,
        max_text_tokens=evaluate.max_text_tokens,
        device=device,
    )


def judged_test_set(
    model: MultimodalModel, paths: dict[str, str], prompts: int, seed: int, task_examples: int = 0
) -> tuple[SceneJudge, TestSet]:
    """The corpus's scene judge and the evaluate stage's seeded test sample (``prompts``
    text-to-image prompts, ``task_examples`` rows per table task); exits when the corpus has
    no judge (these benchmarks score ShapeWorld scenes)."""
    judge = load_judge(paths["corpus"])
    if judge is None:
        raise SystemExit(f"{paths['corpus']} has no scene judge: this benchmark needs ShapeWorld")
    decode = model.codec.decode_text
    test = load_test_set(paths["corpus"], paths["tokens"], decode, prompts, task_examples, seed)
    return judge, test


def apply_override(tree: dict, assignment: str) -> None:
    """``a.b.c=value`` sets ``tree['a']['b']['c']`` to the YAML value; the key must exist
    unless its parent section is a free mapping (load_params then checks it strictly)."""
    path, sep, value = assignment.partition("=")
    if not sep:
        raise SystemExit(f"-S {assignment!r}: expected section.key=value")
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise SystemExit(f"-S {assignment!r}: params.yaml has no section {part!r}")
        node = node[part]
    node[leaf] = yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="run name (folder under --work)")
    parser.add_argument("--stage", choices=("pretrain", "sft"), default="pretrain")
    parser.add_argument("--base", help="sft: the run name or model folder to fine-tune")
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--work", default=".scratch/quality_loop")
    parser.add_argument("--table", default="benchmarks/results/quality_loop.jsonl")
    parser.add_argument("--prompts", type=int, default=400, help="test prompts (<= test split)")
    parser.add_argument("--samples", type=int, default=2, help="re-ranked samples per prompt")
    parser.add_argument("--strategy", default="top_p")
    parser.add_argument("--cfg", type=float, action="append", help="CFG weights (default 1)")
    parser.add_argument("--retrieved", type=int, default=None, help="default evaluate.retrieved")
    parser.add_argument("--eval-only", action="store_true", help="score the existing model")
    parser.add_argument(
        "--paraphrase",
        type=int,
        default=0,
        help="prompt text-to-image with each test caption's Nth phrasing (0: the primary one)",
    )
    parser.add_argument(
        "--device", default="auto", help="generation device: auto (CUDA when available), cpu, cuda"
    )
    parser.add_argument(
        "--retrieval",
        help="a memory bank and neighbor table other than dvc.yaml's (e.g. one built with other "
        "index.policy params): pretraining and generation-time retrieval both use it",
    )
    args = parser.parse_args()

    tree = yaml.safe_load(Path(args.params).read_text())
    for assignment in args.overrides:
        apply_override(tree, assignment)
    work = Path(args.work) / args.name
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    params = load_params(work / "params.yaml")
    seed = params.base.seed

    logged: dict[str, float] = {}
    steps = (params.pretrain if args.stage == "pretrain" else params.sft).train.steps

    def on_log(step: int, metrics: dict) -> None:
        logged.update({k: v for k, v in metrics.items() if isinstance(v, float)})
        if "train/loss" in metrics:
            print(
                f"[{args.name}] step {step}/{steps} "
                f"loss {metrics['train/loss']:.3f} "
                f"{metrics.get('train/tokens_per_second', 0):.0f} tok/s",
                flush=True,
            )
        if "val/loss" in metrics:
            print(f"[{args.name}] step {step} val loss {metrics['val/loss']:.3f}", flush=True)

    # artifact paths as the stages' commands in dvc.yaml name them
    paths = {**stage_arguments(".", "pretrain"), **stage_arguments(".", "evaluate")}
    if args.retrieval:
        paths["retrieval"] = args.retrieval
    if args.stage == "sft" and args.base is None:
        raise SystemExit("--stage sft needs --base (a run name or a pretrained model folder)")
    model_dir = work / args.stage
    tick = time.perf_counter()
    if not args.eval_only and args.stage == "pretrain":
        pretrain(
            paths["tokens"],
            paths["retrieval"],
            params.pretrain,
            seed,
            model_dir,
            work / "scratch",
            on_log,
        )
    elif not args.eval_only:
        base = Path(args.base)
        if not (base / "config.json").is_file():
            base = Path(args.work) / args.base / "pretrain"
        finetune(
            base,
            paths["tokens"],
            paths["text-tokenizer"],
            params.sft,
            seed,
            model_dir,
            work / "scratch_sft",
            on_log,
        )
    train_seconds = time.perf_counter() - tick
    tokens_seen = logged.get("train/tokens_seen", 0.0)

    evaluate = params.evaluate
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    model = load_scored_model(model_dir, paths, evaluate, device)
    examples = evaluate.task_examples if args.stage == "sft" else 0
    judge, test = judged_test_set(model, paths, args.prompts, seed, examples)
    for d in test.documents:  # the text-to-image prompts (the judge reads the scene, not this)
        if args.paraphrase >= len(d["paraphrases"]):
            raise SystemExit(f"--paraphrase {args.paraphrase}: {d['id']} has fewer phrasings")
        d["caption"] = d["paraphrases"][args.paraphrase]
    default_retrieved = evaluate.retrieved if args.stage == "pretrain" else evaluate.sft_retrieved
    retrieved = default_retrieved if args.retrieved is None else args.retrieved
    results = {}
    t2i = TASKS["text_to_image"]
    for weight in args.cfg or [1.0]:
        plan = strategies(evaluate.decoding, args.strategy, args.samples, weight)
        tick = time.perf_counter()
        drawn = model.run(t2i.name, task_inputs(t2i, test.documents), plan, retrieved, seed)
        metrics, _ = score_task(
            model, t2i, test.documents, judge, plan, retrieved, seed, generations=drawn
        )
        # every sample judged, not only the re-ranked one: the generator vs the re-ranker
        right, objects = sample_correctness(model, test.documents, drawn, judge, "objects")
        metrics.update(generator_columns(right, objects, args.samples))
        metrics["eval_seconds"] = time.perf_counter() - tick
        results[f"cfg_{weight:g}"] = metrics
        print(f"[{args.name}] cfg {weight:g}: " + _summary(metrics), flush=True)
    if args.stage == "sft":  # every other task, as the evaluate stage scores it
        for spec in TASKS.values():
            if spec.name == "text_to_image":
                continue
            rows = test.documents if spec.table is None else test.tasks[spec.name]
            plan = answer_strategy(evaluate.decoding)
            metrics, _ = score_task(model, spec, rows, judge, plan, retrieved, seed)
            results[spec.name] = metrics
            value, (low, high) = metrics[spec.headline], metrics[f"{spec.headline}_ci95"]
            print(
                f"[{args.name}] {spec.name} {spec.headline} {value:.3f} [{low:.3f}, {high:.3f}]",
                flush=True,
            )

    line = {
        "name": args.name,
        "stage": args.stage,
        "base": args.base,
        "overrides": args.overrides,
        "machine": describe_machine(),
        "train_seconds": round(train_seconds, 1),
        "tokens_seen": tokens_seen,
        "val": {k: round(v, 4) for k, v in logged.items() if k.startswith(("val/", "query"))},
        "eval": {
            "prompts": len(test.documents),
            "samples": args.samples,
            "strategy": args.strategy,
            "retrieved": retrieved,
            "paraphrase": args.paraphrase,
        },
        "retrieval": paths["retrieval"],
        "results": results,
    }
    append_line(args.table, line)


def _summary(m: dict) -> str:
    low, high = m["accuracy_ci95"]
    parts = [f"exact {m['accuracy']:.3f} [{low:.3f}, {high:.3f}]"]
    for count in (1, 2):
        if f"accuracy_{count}_objects" in m:
            lo, hi = m[f"accuracy_{count}_objects_ci95"]
            parts.append(
                f"{count}-obj {m[f'accuracy_{count}_objects']:.3f} [{lo:.3f}, {hi:.3f}] "
                f"(n={m[f'examples_{count}_objects']}, any right "
                f"{m[f'any_object_right_{count}_objects']:.2f})"
            )
    if "oracle_accuracy" in m:
        nan = float("nan")
        sample_2, oracle_2 = (m.get(f"{k}_accuracy_2_objects", nan) for k in ("sample", "oracle"))
        parts.append(
            f"samples right {m['sample_accuracy']:.3f} (2-obj {sample_2:.3f}), a right one "
            f"among them {m['oracle_accuracy']:.3f} (2-obj {oracle_2:.3f})"
        )
    parts.append(
        " ".join(f"{a} {m[f'{a}_accuracy']:.2f}" for a in ("position", "shape", "color", "size"))
    )
    parts.append(f"count {m['object_count_accuracy']:.2f} objects {m['objects_right']:.2f}")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
