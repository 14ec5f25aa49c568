"""Re-rankers compared on the same samples: how much of the generator's best does each one keep?

The evaluate stage draws ``samples`` images per text-to-image prompt and keeps the one the dual
encoder (the CLIP stand-in of :mod:`cm3leon.retrieval.dual_encoder`) scores highest. Judging
*every* sample with the scene parser gives the ceiling a perfect re-ranker would reach (the
``oracle``). This script draws the samples once (the evaluate stage's plan: its decoding
strategy, ``--cfg``, ``--samples``, seed and test prompts) and scores several re-rankers on
exactly those samples, so their differences are paired (Newcombe's interval, as the studies)::

    python benchmarks/reranking.py                                 # the pipeline's dual encoder
    python benchmarks/reranking.py --retrain steps1500='{"train": {"steps": 1500}}'
    python benchmarks/reranking.py --caption-scorer models/sft      # + caption likelihood

Re-rankers:

- ``dual_encoder``: ``models/retriever`` alone (its logit), the paper's CLIP re-ranking and
  the baseline of every diff;
- ``--retrain NAME=JSON``: a dual encoder retrained on the train split with ``index.encoder`` /
  ``index.train`` overrides (``{"encoder": {...}, "train": {...}}``), e.g. more steps;
- ``--caption-scorer MODEL``: the log-likelihood a decoder assigns to the prompt's caption given
  each sample, ``log p(caption | image)`` — a pretrained model through CM3 infilling
  (``<mask:0> <break> image <mask:0> caption <eos_span>``, the format its null-condition
  documents train), an SFT model through its captioning template
  (:meth:`~cm3leon.inference.multimodal.MultimodalModel.caption_log_likelihood`) — alone,
  added to the dual encoder's logit (``logit(dual) + w ll``, the evaluate stage's re-ranker with
  ``evaluate.decoding.rerank_caption_weight`` = w and the SFT model as captioner) and added
  after standardizing both within each prompt (``z(dual) + w z(ll)``).

Appends one JSON line per run to ``--table`` (default ``benchmarks/results/reranking.jsonl``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from machine import append_line, describe_machine
from quality_loop import judged_test_set, load_scored_model

from cm3leon.config import load_params
from cm3leon.evaluation.metrics import paired_difference_interval, wilson_interval
from cm3leon.evaluation.tasks import sample_correctness, strategies, task_inputs
from cm3leon.inference.multimodal import MultimodalModel
from cm3leon.project import stage_arguments
from cm3leon.retrieval.memory_bank import load_split
from cm3leon.retrieval.training import train_dual_encoder
from cm3leon.tasks import TASKS

COMBINATION_WEIGHTS = (0.25, 0.5, 1.0, 2.0)


def standardized(scores: np.ndarray) -> np.ndarray:
    return (scores - scores.mean(1, keepdims=True)) / (scores.std(1, keepdims=True) + 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/pretrain", help="the generator")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prompts", type=int, default=800, help="test prompts")
    parser.add_argument("--samples", type=int, default=None, help="default evaluate's")
    parser.add_argument("--cfg", type=float, default=None, help="default evaluate's")
    parser.add_argument("--retrain", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--caption-scorer", action="append", default=[], metavar="MODEL")
    parser.add_argument("--table", default="benchmarks/results/reranking.jsonl")
    args = parser.parse_args()

    params = load_params(args.params)
    seed, evaluate = params.base.seed, params.evaluate
    decoding = evaluate.decoding
    samples = args.samples or decoding.samples
    cfg = decoding.cfg_weight if args.cfg is None else args.cfg
    paths = {**stage_arguments(".", "index"), **stage_arguments(".", "evaluate")}
    generator = load_scored_model(args.model, paths, evaluate, "cpu")
    judge, test = judged_test_set(generator, paths, args.prompts, seed)
    rows = test.documents
    t2i = TASKS["text_to_image"]
    plan = strategies(decoding, decoding.strategy, samples, cfg)
    tick = time.perf_counter()
    drawn = generator.run(t2i.name, task_inputs(t2i, rows), plan, 0, seed)
    generate_seconds = time.perf_counter() - tick
    right, objects = sample_correctness(generator, rows, drawn, judge, "objects")
    codes = np.array([g.sample_codes for g in drawn])  # (prompts, samples, cells)
    captions = [row["caption"] for row in rows]
    n = len(rows)

    vocab = generator.vocab
    # the generator re-ranks by the dual encoder alone (load_scored_model sets no captioner):
    # its scores are the dual encoder's logits
    scores = {"dual_encoder": np.array([g.rerank_scores for g in drawn])}
    if args.retrain:  # what a retrained dual encoder scores: the samples' pixels, the captions
        images = generator.decode_ids(
            [vocab.image_to_vocab(c) for c in codes.reshape(-1, codes.shape[-1])]
        )
        queries = [vocab.vocab_to_text(generator.codec.encode_text(c)) for c in captions]
        train = load_split(paths["corpus"], paths["tokens"], vocab, "train")
    for spec in args.retrain:
        name, _, overrides = spec.partition("=")
        changes = json.loads(overrides or "{}")
        encoder = dataclasses.replace(params.index.encoder, **changes.get("encoder", {}))
        schedule = dataclasses.replace(params.index.train, **changes.get("train", {}))
        tick = time.perf_counter()
        model = train_dual_encoder(
            train.paraphrases, train.images, encoder, schedule, generator.vocab.text_size, seed
        )
        print(f"{name}: trained in {time.perf_counter() - tick:.0f} s", flush=True)
        image_embeddings = model.embed_image(images).reshape(n, samples, -1)
        scores[name] = np.einsum("psd,pd->ps", image_embeddings, model.embed_text(queries))
    for folder in args.caption_scorer:
        scorer = MultimodalModel.load(folder, paths["vq"], paths["text-tokenizer"], paths["tokens"])
        images = [vocab.image_to_vocab(c.tolist()) for c in codes.reshape(-1, codes.shape[-1])]
        repeated = [c for c in captions for _ in range(samples)]
        likelihood = scorer.caption_log_likelihood(repeated, images).reshape(n, samples)
        label = f"caption_ll[{folder}]"
        scores[label] = likelihood
        for weight in COMBINATION_WEIGHTS:
            combined = standardized(scores["dual_encoder"]) + weight * standardized(likelihood)
            scores[f"dual_encoder+{weight:g}*{label}"] = combined
            # the pipeline's (MultimodalModel.rerank_scores): the dual encoder's logit (its
            # scale times the cosine) plus w log p(caption | image), each sample alone
            logit = scores["dual_encoder"] + weight * likelihood
            scores[f"logit(dual_encoder)+{weight:g}*{label}"] = logit

    baseline = right[np.arange(n), scores["dual_encoder"].argmax(1)]
    results = {}
    for name, score in scores.items():
        picked = right[np.arange(n), score.argmax(1)]
        row = {"accuracy": float(picked.mean()), "accuracy_ci95": wilson_interval(picked.sum(), n)}
        for count in sorted(set(objects.tolist())):
            chosen = objects == count
            row[f"accuracy_{count}_objects"] = float(picked[chosen].mean())
        diff, low, high = paired_difference_interval(picked, baseline)
        row["minus_dual_encoder"], row["minus_dual_encoder_ci95"] = diff, (low, high)
        results[name] = row
        print(
            f"{name}: {row['accuracy']:.4f} [{row['accuracy_ci95'][0]:.4f}, "
            f"{row['accuracy_ci95'][1]:.4f}]; "
            + ", ".join(
                f"{c} obj {row[f'accuracy_{c}_objects']:.4f}" for c in sorted(set(objects.tolist()))
            )
            + f"; minus dual encoder {diff:+.4f} [{low:+.4f}, {high:+.4f}]",
            flush=True,
        )
    ceiling = {
        "sample_accuracy": float(right.mean()),
        "oracle_accuracy": float(right.any(1).mean()),
    }
    for count in sorted(set(objects.tolist())):
        chosen = objects == count
        ceiling[f"sample_accuracy_{count}_objects"] = float(right[chosen].mean())
        ceiling[f"oracle_accuracy_{count}_objects"] = float(right[chosen].any(1).mean())
    print("generator: " + ", ".join(f"{k} {v:.4f}" for k, v in ceiling.items()), flush=True)
    line = {
        "model": args.model,
        "prompts": n,
        "samples": samples,
        "strategy": decoding.strategy,
        "cfg_weight": cfg,
        "generate_seconds": round(generate_seconds, 1),
        "machine": describe_machine(),
        "generator": ceiling,
        "rerankers": results,
    }
    append_line(args.table, line)


if __name__ == "__main__":
    main()
