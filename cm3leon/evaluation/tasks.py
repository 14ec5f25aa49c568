"""Score a model on every task of the held-out split (DESIGN.md §10; CM3Leon §5).

:func:`load_test_set` picks a seeded sample of test documents and task rows (a task belongs to
the split of its image, as in SFT) and joins the tokens with the corpus pixels the metrics
need. Each ``score_*`` function runs one task through a
:class:`~cm3leon.decoding.multimodal.MultimodalModel` and returns ``(metrics, records)``:
metrics as plain floats, records one dict per example (prompt, output, correctness, retrieved
documents) for the predictions files and the lineage of every generated sample.

Judging is exact wherever ShapeWorld allows: generated images are read back by the template
parser (every attribute of every object must be right for text-to-image, editing and
grounding), captions by :func:`~cm3leon.data.shapeworld_parser.parse_caption`, segmentation
masks by IoU with the true mask, VQA answers with the official VQA accuracy (one exact answer
per question, counted as ten agreeing annotators).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon.config import DecodingConfig, ShapeWorldConfig
from cm3leon.data.corpus import decode_images, read_documents, read_task_table
from cm3leon.data.shapeworld import scene_from_json
from cm3leon.data.shapeworld_parser import (
    ShapeWorldParser,
    agreement_summary,
    compare_scene,
    parse_caption,
    same_objects,
    truth_objects,
)
from cm3leon.decoding.multimodal import Generation, MultimodalModel, TaskInput
from cm3leon.decoding.selector import Strategy, sample_plan
from cm3leon.evaluation.metrics import (
    binarize_mask,
    caption_scores,
    clip_score,
    frechet_distance,
    mask_iou,
    vqa_accuracy,
)
from cm3leon.tokenizers.tokens import read_split, read_task_tokens


@dataclass
class TestSet:
    documents: list[dict[str, Any]]  # id, caption, paraphrases, image_ids, objects, pixels
    tasks: dict[str, list[dict[str, Any]]]  # vqa, editing, grounding, segmentation rows
    real_pixels: np.ndarray  # (N, H, W, 3) every test image, for FID


def load_test_set(
    corpus_dir: str | Path,
    tokens_dir: str | Path,
    decode_text,
    prompts: int,
    task_examples: int,
    seed: int,
) -> TestSet:
    """A seeded sample of ``prompts`` test documents and ``task_examples`` rows per task."""
    tokens = read_split(tokens_dir, "test").to_pylist()
    corpus = read_documents(corpus_dir, ["id", "image", "height", "width"], split="test")
    if [d["id"] for d in tokens] != corpus.column("id").to_pylist():
        raise ValueError(f"{tokens_dir} and {corpus_dir} list different test documents")
    pixels = decode_images(corpus)
    by_id = {}
    for d, image in zip(tokens, pixels, strict=True):
        d["pixels"] = image
        d["paraphrases"] = [decode_text(p) for p in d["paraphrase_ids"]]
        by_id[d["id"]] = d
    rng = np.random.default_rng([seed, 0xE7A1])
    documents = [tokens[i] for i in _sample(rng, len(tokens), prompts)]
    masks = {
        (r["image_id"], r["instruction"]): r["mask"]
        for r in read_task_table(corpus_dir, "segmentation").to_pylist()
    }
    tasks = {}
    for task, table in (
        ("vqa", "vqa"),
        ("editing", "edits"),
        ("grounding", "grounding"),
        ("segmentation", "segmentation"),
    ):
        rows = [
            r for r in read_task_tokens(tokens_dir, table).to_pylist() if r["image_id"] in by_id
        ]
        rows = [rows[i] for i in _sample(rng, len(rows), task_examples)]
        for r in rows:
            r["image_ids"] = by_id[r["image_id"]]["image_ids"]
            r["pixels"] = by_id[r["image_id"]]["pixels"]
            if task == "segmentation":
                size = r["pixels"].shape[0]
                raw = masks[(r["image_id"], r["instruction"])]
                r["mask"] = np.frombuffer(raw, np.uint8).reshape(size, size)
        tasks[task] = rows
    return TestSet(documents, tasks, pixels)


def _sample(rng: np.random.Generator, size: int, count: int) -> list[int]:
    return sorted(rng.choice(size, min(count, size), replace=False).tolist())


def strategies(
    config: DecodingConfig, name: str, samples: int, cfg_weight: float
) -> list[Strategy]:
    """One strategy per sample (:func:`sample_plan`) with the config's sampling settings."""
    return sample_plan(
        name,
        samples,
        cfg_weight=cfg_weight,
        temperature=config.temperature,
        top_p=config.top_p,
        cd_alpha=config.cd_alpha,
        cd_k=config.cd_k,
    )


def answer_strategy(config: DecodingConfig) -> list[Strategy]:
    """One sample for tasks with a single right output (captions, answers, edits, masks)."""
    return [Strategy(config.answer_strategy, temperature=config.temperature, top_p=config.top_p)]


# --- text to image ------------------------------------------------------------------------------
def score_text_to_image(
    model: MultimodalModel,
    documents: Sequence[dict],
    parser: ShapeWorldParser,
    plan: list[Strategy],
    retrieved: int,
    seed: int,
    real_pixels: np.ndarray | None = None,
) -> tuple[dict[str, float], list[dict], list[Generation]]:
    items = [TaskInput(texts={"caption": d["caption"]}) for d in documents]
    generations = model.run("text_to_image", items, plan, retrieved, seed)
    metrics, records = judge_images(model, documents, generations, parser, "objects")
    if real_pixels is not None and model.retriever is not None:
        generated = np.stack([r["image"] for r in records])
        metrics.update(feature_metrics(model, documents, generated, real_pixels))
    return metrics, records, generations


def judge_images(
    model: MultimodalModel,
    rows: Sequence[dict],
    generations: Sequence[Generation],
    parser: ShapeWorldParser,
    truth_key: str,
    best: Sequence[int] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Exact-scene accuracy overall and by object count, plus per-attribute accuracy."""
    picks = list(best) if best is not None else [g.best for g in generations]
    chosen = [g.sample_codes[b] for g, b in zip(generations, picks, strict=True)]
    images = model.decode_ids([model.vocab.image_to_vocab(c) for c in chosen])
    agreements, by_count, records = [], {}, []
    for row, image, generation, pick in zip(rows, images, generations, picks, strict=True):
        truth = truth_objects(scene_from_json(row[truth_key]))
        parsed = parser.parse(image)
        agreement = compare_scene(truth, parsed)
        agreements.append(agreement)
        by_count.setdefault(len(truth), []).append(agreement.exact)
        records.append(
            {
                "correct": bool(agreement.exact),
                "parsed": [o.__dict__ for o in parsed],
                "retrieved": [d.provenance() for d in generation.retrieved],
                "strategies": generation.strategies,
                "best_sample": pick,
                "image": image,
            }
        )
    summary = agreement_summary(agreements)
    metrics = {"accuracy": summary["exact_scene_rate"], "examples": len(rows)}
    for name in ("position", "shape", "color", "size"):
        metrics[f"{name}_accuracy"] = summary[f"{name}_accuracy"]
    for count, values in sorted(by_count.items()):
        metrics[f"accuracy_{count}_objects"] = float(np.mean(values))
        metrics[f"examples_{count}_objects"] = len(values)
    return metrics, records


def feature_metrics(model, documents, generated, real_pixels) -> dict[str, float]:
    """FID and CLIPScore in the *dual encoder's* feature space (not Inception's), for the
    ``(N, H, W, 3)`` images generated for ``documents``."""
    image_emb = model.retriever.embed_image(generated)
    real_emb = model.retriever.embed_image(real_pixels)
    texts = [model.vocab.vocab_to_text(model.codec.encode_text(d["caption"])) for d in documents]
    text_emb = model.retriever.embed_text(texts)
    return {
        "fid_dual_encoder": frechet_distance(image_emb, real_emb),
        "clip_score_dual_encoder": clip_score(text_emb, image_emb),
    }


# --- the other tasks ----------------------------------------------------------------------------
def score_captioning(model, documents, config: ShapeWorldConfig, plan, retrieved, seed):
    items = [TaskInput(images={"image": d["image_ids"]}, pixels=d["pixels"]) for d in documents]
    generations = model.run("captioning", items, plan, retrieved, seed)
    predictions = {d["id"]: g.text for d, g in zip(documents, generations, strict=True)}
    references = {d["id"]: d["paraphrases"] for d in documents}
    metrics = caption_scores(predictions, references)
    exact = []
    records = []
    for d, g in zip(documents, generations, strict=True):
        truth = truth_objects(scene_from_json(d["objects"]))
        parsed = parse_caption(g.text, config.grid_size, config.shapes, config.colors, config.sizes)
        exact.append(same_objects(truth, parsed))
        records.append(
            {
                "image_id": d["id"],
                "caption": g.text,
                "correct": exact[-1],
                "retrieved": [r.provenance() for r in g.retrieved],
            }
        )
    metrics["attribute_exact_match"] = float(np.mean(exact))
    metrics["examples"] = len(documents)
    return metrics, records


def score_vqa(model, rows, plan, retrieved, seed):
    items = [
        TaskInput(
            texts={"question": r["question"]}, images={"image": r["image_ids"]}, pixels=r["pixels"]
        )
        for r in rows
    ]
    generations = model.run("vqa", items, plan, retrieved, seed)
    scores, by_type, records = [], {}, []
    for r, g in zip(rows, generations, strict=True):
        score = vqa_accuracy(g.text, [r["answer"]] * 10)
        scores.append(score)
        by_type.setdefault(r["question_type"], []).append(score)
        records.append(
            {
                "image_id": r["image_id"],
                "question": r["question"],
                "answer": g.text,
                "truth": r["answer"],
                "correct": score == 1.0,
            }
        )
    metrics = {"accuracy": float(np.mean(scores)), "examples": len(rows)}
    metrics.update({f"accuracy_{t}": float(np.mean(v)) for t, v in sorted(by_type.items())})
    return metrics, records


def score_image_task(model, task: str, rows, parser, plan, retrieved, seed):
    """Editing and grounding: exact scene; segmentation: mask IoU."""
    if task == "editing":
        items = [
            TaskInput(
                texts={"instruction": r["instruction"]},
                images={"image": r["image_ids"]},
                pixels=r["pixels"],
            )
            for r in rows
        ]
    elif task == "grounding":
        items = [TaskInput(texts={"prompt": r["prompt"]}) for r in rows]
    else:
        items = [
            TaskInput(
                texts={"instruction": r["instruction"]},
                images={"image": r["image_ids"]},
                pixels=r["pixels"],
            )
            for r in rows
        ]
    generations = model.run(task, items, plan, retrieved, seed)
    if task in ("editing", "grounding"):
        key = "target_objects" if task == "editing" else "objects"
        metrics, records = judge_images(model, rows, generations, parser, key)
        for r, rec in zip(rows, records, strict=True):
            rec.update(
                {"image_id": r["image_id"], "instruction": r.get("instruction", r.get("prompt"))}
            )
        return metrics, records
    images = model.decode_ids([model.vocab.image_to_vocab(g.codes) for g in generations])
    ious, records = [], []
    for r, image, g in zip(rows, images, generations, strict=True):
        iou = mask_iou(binarize_mask(image), r["mask"] > 127)
        ious.append(iou)
        records.append(
            {
                "image_id": r["image_id"],
                "instruction": r["instruction"],
                "iou": iou,
                "image": image,
                "retrieved": [d.provenance() for d in g.retrieved],
            }
        )
    return {"mean_iou": float(np.mean(ious)), "examples": len(rows)}, records
