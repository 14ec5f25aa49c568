"""Does a model use, ignore or follow its context document? Text-to-image with one chosen document.

The retrieval study prepends what the memory bank retrieves; this probe chooses the document
itself, for the test prompts whose exact scene (the same objects, attributes and cells; the
pixel jitter may differ) also occurs in the train split:

- ``none``: no context document (the headline's setting);
- ``exact-scene``: a train document showing the prompt's scene, drawn at random among them —
  what a model that copies from its context would turn into a right image;
- ``random``: a train document drawn at random — what a model that checks its context against
  the caption would ignore.

Each setting generates the evaluate stage's plan (``--samples`` top-p samples at ``--cfg``,
re-ranked by the dual encoder) and is scored by its scene judge::

    python benchmarks/context_probe.py --model models/pretrain
    python benchmarks/context_probe.py --model models/pretrain_no_retrieval

Appends one JSON line per model to ``--table`` (default
``benchmarks/results/context_probe.jsonl``).
"""

from __future__ import annotations

import argparse

import numpy as np
from machine import append_line, describe_machine
from quality_loop import judged_test_set, load_scored_model

from cm3leon.config import load_params
from cm3leon.evaluation.studies import generator_columns
from cm3leon.evaluation.tasks import (
    sample_correctness,
    score_task,
    strategies,
    task_inputs,
)
from cm3leon.project import stage_arguments
from cm3leon.retrieval.search import RetrievedDocument
from cm3leon.tasks import TASKS
from cm3leon.tokenizers.tokens import read_split

KEPT = ("accuracy", "accuracy_ci95", "accuracy_1_objects", "accuracy_2_objects")
ATTRIBUTES = ("shape_accuracy", "color_accuracy", "size_accuracy", "position_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/pretrain")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--prompts",
        type=int,
        default=800,
        help="test prompts drawn; those with a train twin are probed",
    )
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=None, help="default evaluate's")
    parser.add_argument("--table", default="benchmarks/results/context_probe.jsonl")
    args = parser.parse_args()

    params = load_params(args.params)
    seed, evaluate = params.base.seed, params.evaluate
    cfg = evaluate.decoding.cfg_weight if args.cfg is None else args.cfg
    paths = {**stage_arguments(".", "index"), **stage_arguments(".", "evaluate")}
    model = load_scored_model(args.model, paths, evaluate, "cpu")
    judge, test = judged_test_set(model, paths, args.prompts, seed)
    train = read_split(paths["tokens"], "train").to_pylist()

    def scene(objects_json: str) -> tuple:
        return tuple(
            sorted((o.shape, o.color, o.size, o.row, o.col) for o in judge.truth(objects_json))
        )

    twins: dict[tuple, list[dict]] = {}
    for row in train:
        twins.setdefault(scene(row["objects"]), []).append(row)
    rows = [d for d in test.documents if scene(d["objects"]) in twins]
    if not rows:
        raise SystemExit("no test prompt has an exact-scene train document")
    vocab, rng = model.vocab, np.random.default_rng([seed, 0xC0])

    def document(row: dict) -> RetrievedDocument:
        ids = (*row["caption_ids"], vocab.brk, *row["image_ids"])
        return RetrievedDocument(row["id"], row["caption"], 1.0, ids)

    contexts = {
        "none": None,
        "exact-scene": [
            document(twins[scene(d["objects"])][rng.integers(len(twins[scene(d["objects"])]))])
            for d in rows
        ],
        "random": [document(train[rng.integers(len(train))]) for _ in rows],
    }
    t2i = TASKS["text_to_image"]
    plan = strategies(evaluate.decoding, "top_p", args.samples, cfg)
    results = {}
    for name, chosen in contexts.items():
        count = 0 if chosen is None else 1
        given = None if chosen is None else [[d] for d in chosen]  # in the memory bank's place
        drawn = model.run(t2i.name, task_inputs(t2i, rows), plan, count, seed, documents=given)
        metrics, _ = score_task(model, t2i, rows, judge, plan, count, seed, generations=drawn)
        right, objects = sample_correctness(model, rows, drawn, judge, "objects")
        kept = {k: metrics[k] for k in (*KEPT, *ATTRIBUTES) if k in metrics}
        kept.update(generator_columns(right, objects, args.samples))
        results[name] = kept
        low, high = kept["accuracy_ci95"]
        print(
            f"{args.model} context {name}: {kept['accuracy']:.4f} [{low:.4f}, {high:.4f}]; "
            f"shape {kept.get('shape_accuracy', float('nan')):.3f}; "
            f"samples right {kept['sample_accuracy']:.4f}",
            flush=True,
        )
    line = {
        "model": args.model,
        "prompts": len(rows),
        "objects": {c: int(sum(len(judge.truth(d["objects"])) == c for d in rows)) for c in (1, 2)},
        "samples": args.samples,
        "cfg_weight": cfg,
        "machine": describe_machine(),
        "results": results,
    }
    append_line(args.table, line)


if __name__ == "__main__":
    main()
