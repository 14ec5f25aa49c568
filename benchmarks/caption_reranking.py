"""Captioning re-ranked by the image: does the caption that best predicts the picture win?

The evaluate stage captions each test image with one greedy sample
(``evaluate.decoding.answer_strategy``). This draws ``--samples`` captions per image — the
greedy one first, then top-p samples (``--top-p``, temperature 1) — judges every one with the
scene parser (attribute exact match, as the stage), and compares choosers on the same
captions with paired (Newcombe) intervals against the greedy caption:

* ``caption_ll``: the captioner's own ``log p(caption | image)``
  (:meth:`~cm3leon.inference.multimodal.MultimodalModel.caption_log_likelihood`);
* ``image_ll``: ``log p(image | caption)`` under the same model through its text-to-image
  template (:meth:`~cm3leon.inference.multimodal.MultimodalModel.image_log_likelihood`, the
  evaluate stage's caption re-ranker);
* ``image_ll + w caption_ll`` for a few ``w``;
* the ``oracle`` (a right caption among the samples) and the share of right samples.

    python benchmarks/caption_reranking.py [--model models/sft] [--prompts 800] \\
        [--samples 8] [--top-p 0.9]

Appends one JSON line per run to ``--table`` (default
``benchmarks/results/caption_reranking.jsonl``) with the machine description.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from machine import append_line, describe_machine
from quality_loop import judged_test_set, load_scored_model

from cm3leon.config import load_params
from cm3leon.data.shapeworld_parser import same_objects
from cm3leon.decoding.selector import Strategy
from cm3leon.evaluation.metrics import paired_difference_interval, wilson_interval
from cm3leon.evaluation.tasks import task_inputs
from cm3leon.project import stage_arguments
from cm3leon.tasks import TASKS

WEIGHTS = (0.25, 0.5, 1.0, 2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/sft")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prompts", type=int, default=800, help="test images")
    parser.add_argument("--samples", type=int, default=8, help="captions per image")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--table", default="benchmarks/results/caption_reranking.jsonl")
    args = parser.parse_args()

    params = load_params(args.params)
    seed, evaluate = params.base.seed, params.evaluate
    paths = {**stage_arguments(".", "index"), **stage_arguments(".", "evaluate")}
    model = load_scored_model(args.model, paths, evaluate, "cpu")
    judge, test = judged_test_set(model, paths, args.prompts, seed)
    rows = test.documents
    plan = [Strategy.named(evaluate.decoding.answer_strategy)] + [
        Strategy.named("top_p", top_p=args.top_p, temperature=1.0)
    ] * (args.samples - 1)
    tick = time.perf_counter()
    drawn = model.run("captioning", task_inputs(TASKS["captioning"], rows), plan, 0, seed)
    generate_seconds = time.perf_counter() - tick
    captions = [[model.codec.decode_text(s).strip() for s in g.samples] for g in drawn]
    right = np.array(
        [
            [same_objects(judge.truth(d["objects"]), judge.parse_caption(c)) for c in group]
            for d, group in zip(rows, captions, strict=True)
        ]
    )
    flat = [c for group in captions for c in group]
    images = [list(d["image_ids"]) for d in rows for _ in range(args.samples)]
    tick = time.perf_counter()
    image_ll = model.image_log_likelihood(flat, images).reshape(len(rows), -1)
    caption_ll = model.caption_log_likelihood(flat, images).reshape(len(rows), -1)
    score_seconds = time.perf_counter() - tick

    n = len(rows)
    objects = np.array([len(judge.truth(d["objects"])) for d in rows])
    choosers = {"greedy": np.zeros((n, args.samples)), "caption_ll": caption_ll}
    choosers["greedy"][:, 0] = 1.0
    choosers["image_ll"] = image_ll
    for weight in WEIGHTS:
        choosers[f"image_ll+{weight:g}*caption_ll"] = image_ll + weight * caption_ll
    baseline = right[:, 0]
    results = {}
    for name, score in choosers.items():
        picked = right[np.arange(n), score.argmax(1)]
        diff, low, high = paired_difference_interval(picked, baseline)
        row = {
            "attribute_exact_match": float(picked.mean()),
            "ci95": wilson_interval(picked.sum(), n),
            "minus_greedy": diff,
            "minus_greedy_ci95": (low, high),
        }
        for count in sorted(set(objects.tolist())):
            row[f"{count}_objects"] = float(picked[objects == count].mean())
        results[name] = row
        print(
            f"{name}: {row['attribute_exact_match']:.4f} [{row['ci95'][0]:.4f}, "
            f"{row['ci95'][1]:.4f}]; "
            + ", ".join(f"{c} obj {row[f'{c}_objects']:.3f}" for c in sorted(set(objects.tolist())))
            + f"; minus greedy {diff:+.4f} [{low:+.4f}, {high:+.4f}]",
            flush=True,
        )
    ceiling = {"sample_accuracy": float(right.mean()), "oracle": float(right.any(1).mean())}
    print(f"samples right {ceiling['sample_accuracy']:.4f}, oracle {ceiling['oracle']:.4f}")
    append_line(
        args.table,
        {
            "model": args.model,
            "prompts": n,
            "samples": args.samples,
            "top_p": args.top_p,
            "generate_seconds": round(generate_seconds, 1),
            "score_seconds": round(score_seconds, 1),
            "machine": describe_machine(),
            "ceiling": ceiling,
            "choosers": results,
        },
    )


if __name__ == "__main__":
    main()
