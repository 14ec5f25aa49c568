"""Score a model on every task of the held-out split (DESIGN.md §10; CM3Leon §5).

:func:`load_test_set` picks a seeded sample of test documents and task rows (a task belongs to
the split of its image, as in SFT) and joins the tokens with the corpus pixels the metrics
need. :func:`score_task` runs one task of the registry (:mod:`cm3leon.tasks`) through a
:class:`~cm3leon.inference.multimodal.MultimodalModel` with the scorer its spec names
(:data:`SCORERS`) and returns ``(metrics, records)``: metrics as plain floats, records one
dict per example (prompt, output, correctness, retrieved documents) for the predictions files
and the lineage of every generated sample.

Two layers of metrics (DESIGN.md §10):

- **generic**, on any data: text-to-image R-precision, CLIPScore and FID in the dual encoder's
  feature space (named so), each beside the same metric for the real test images (the
  ceiling); captioning CIDEr-D / BLEU against every reference caption; VQA accuracy; mask IoU.
  Caveat: image samples are re-ranked by the same dual encoder, so the generated side of
  R-precision and CLIPScore is optimistic by construction: compare models and settings with
  each other, and with the real-image ceiling, not with published numbers.
- **exact**, when the corpus comes with a scene judge (:mod:`cm3leon.data.scene_judge`,
  ShapeWorld): generated images are read back by the template parser (every attribute of every
  object must be right for text-to-image, editing and grounding), captions by the caption
  parser; VQA answers are scored with the official VQA accuracy (one exact answer per
  question, counted as ten agreeing annotators).

A task whose headline needs a judge and that has no generic metric (editing and grounding:
:func:`cm3leon.tasks.headline_metric`) is not scored without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon.config import DecodingConfig
from cm3leon.data.corpus import decode_images, read_documents, read_task_table
from cm3leon.data.scene_judge import SceneJudge
from cm3leon.data.shapeworld_parser import agreement_summary, compare_scene, same_objects
from cm3leon.decoding.selector import Strategy, sample_plan
from cm3leon.evaluation.metrics import (
    binarize_mask,
    caption_scores,
    clip_scores,
    frechet_distance,
    mask_iou,
    mean_interval,
    r_precision_hits,
    row_cosines,
    vqa_accuracy,
    wilson_interval,
)
from cm3leon.inference.multimodal import Generation, MultimodalModel, TaskInput
from cm3leon.tasks import TABLE_TASKS, TaskSpec
from cm3leon.tokenizers.tokens import read_split, read_task_tokens

R_PRECISION_CANDIDATES = 100  # the prompt + 99 other test captions (AttnGAN's protocol)


@dataclass
class TestSet:
    documents: list[dict[str, Any]]  # id, caption, paraphrases, image_ids, objects, pixels
    tasks: dict[str, list[dict[str, Any]]]  # rows of each table task, by task name
    real_pixels: np.ndarray  # (N, H, W, 3) every test image, for FID


def load_test_set(
    corpus_dir: str | Path,
    tokens_dir: str | Path,
    decode_text,
    prompts: int,
    task_examples: int,
    seed: int,
) -> TestSet:
    """A seeded sample of ``prompts`` test documents and ``task_examples`` rows per table task
    (in the registry's order, which fixes the draws). A row of a task that produces an image
    also carries the true image, ``(H, W)`` or ``(H, W, 3)`` uint8, under its corpus column."""
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
    tasks = {}
    for table, spec in TABLE_TASKS.items():
        rows = [
            r for r in read_task_tokens(tokens_dir, table).to_pylist() if r["image_id"] in by_id
        ]
        rows = [rows[i] for i in _sample(rng, len(rows), task_examples)]
        truth = _true_images(corpus_dir, spec) if spec.image is not None else {}
        for r in rows:
            r["image_ids"] = by_id[r["image_id"]]["image_ids"]
            r["pixels"] = by_id[r["image_id"]]["pixels"]
            if truth:
                size = r["pixels"].shape[0]
                shape = (size, size) if spec.image.channels == 1 else (size, size, 3)
                raw = truth[(r["image_id"], *(r[t] for t in spec.input_texts))]
                r[spec.image.column] = np.frombuffer(raw, np.uint8).reshape(shape)
        tasks[spec.name] = rows
    return TestSet(documents, tasks, pixels)


def _true_images(corpus_dir, spec: TaskSpec) -> dict[tuple, bytes]:
    """Raw true images of a task table, keyed by ``(image_id, *input texts)``."""
    column = spec.image.column
    return {
        (r["image_id"], *(r[t] for t in spec.input_texts)): r[column]
        for r in read_task_table(corpus_dir, spec.table).to_pylist()
    }


def _sample(rng: np.random.Generator, size: int, count: int) -> list[int]:
    return sorted(rng.choice(size, min(count, size), replace=False).tolist())


def strategies(
    config: DecodingConfig, name: str, samples: int, cfg_weight: float
) -> list[Strategy]:
    """One strategy per sample of plan ``name`` (:func:`sample_plan`) at ``cfg_weight``."""
    return sample_plan(config, name, samples, cfg_weight=cfg_weight)


def answer_strategy(config: DecodingConfig, guided: bool = False) -> list[Strategy]:
    """One sample for tasks with a single right output (answers, edits, grounded images,
    masks): unguided, or with ``guided`` at ``config.answer_cfg_weight`` — for a task whose
    unconditional stream SFT trains (:attr:`~cm3leon.tasks.TaskSpec.guidable`)."""
    weight = config.answer_cfg_weight if guided else 1.0
    return [Strategy.from_config(config, config.answer_strategy, cfg_weight=weight)]


def task_plan(config: DecodingConfig, spec: TaskSpec) -> list[Strategy]:
    """How the evaluate stage (and the CLI) decodes task ``spec``: the headline plan's samples,
    re-ranked, for a :attr:`~cm3leon.tasks.TaskSpec.reranked` task (text-to-image);
    :func:`caption_strategy` for a task that writes a caption; else one answer sample, guided
    when the task is :attr:`~cm3leon.tasks.TaskSpec.guidable`."""
    if spec.reranked:
        return strategies(config, config.strategy, config.samples, config.cfg_weight)
    if spec.writes_caption:
        return caption_strategy(config)
    return answer_strategy(config, guided=spec.guidable)


def caption_strategy(config: DecodingConfig) -> list[Strategy]:
    """Captioning's plan: the answer strategy's caption, then ``caption_samples - 1`` top-p
    captions at ``caption_top_p`` (temperature 1, no CFG); several are re-ranked by the image
    they predict (:meth:`~cm3leon.inference.multimodal.MultimodalModel.image_log_likelihood`)."""
    sampled = Strategy.from_config(
        config, "top_p", cfg_weight=1.0, top_p=config.caption_top_p, temperature=1.0
    )
    return answer_strategy(config) + [sampled] * (config.caption_samples - 1)


def task_inputs(spec: TaskSpec, rows: Sequence[dict]) -> list[TaskInput]:
    """The prompt inputs of each row: its input text fields and, when the template shows the
    document's image, that image (Vocab ids, and pixels for retrieval by image)."""
    unknown = [slot for slot in spec.input_images if slot != "image"]
    if unknown:
        raise ValueError(f"task {spec.name!r}: input images {unknown} have no source")
    with_image = bool(spec.input_images)
    return [
        TaskInput(
            texts={f: r[f] for f in spec.input_texts},
            images={"image": r["image_ids"]} if with_image else {},
            pixels=r["pixels"] if with_image else None,
        )
        for r in rows
    ]


def score_task(
    model: MultimodalModel,
    spec: TaskSpec,
    rows: Sequence[dict],
    judge: SceneJudge | None,
    plan: list[Strategy],
    retrieved: int,
    seed: int,
    real_pixels: np.ndarray | None = None,
    generations: Sequence[Generation] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Generate for every row of task ``spec`` and score with its scorer (:data:`SCORERS`).
    ``judge``: the corpus's scene judge, ``None`` for the generic metrics only.
    ``real_pixels``: real images for the feature-space metrics of a text-to-image task.
    ``generations``: the rows' generations when drawn already (a shared pool), else drawn here
    with ``plan``."""
    if generations is None:
        generations = model.run(spec.name, task_inputs(spec, rows), plan, retrieved, seed)
    return SCORERS[spec.scorer](model, spec, rows, generations, judge, real_pixels, seed)


# --- scorers ------------------------------------------------------------------------------------
def score_scene(model, spec: TaskSpec, rows, generations, judge, real_pixels, seed):
    """Generated images: exact scene against the row's ``spec.truth`` objects by the judge;
    for text-to-image also R-precision, CLIPScore and FID with their real-image ceilings."""
    metrics, records = image_metrics(model, rows, generations, judge, spec.truth, seed=seed)
    if spec.table is not None:
        for r, rec in zip(rows, records, strict=True):
            rec.update({"image_id": r["image_id"], "instruction": r[spec.input_texts[0]]})
        if model.retriever is not None and rows:
            generated = np.stack([r["image"] for r in records])
            metrics.update(target_metrics(model, spec, rows, generated))
    elif real_pixels is not None and model.retriever is not None:
        generated = np.stack([r["image"] for r in records])
        metrics.update(feature_metrics(model, rows, generated, real_pixels, seed))
    return metrics, records


def image_metrics(
    model: MultimodalModel,
    rows: Sequence[dict],
    generations: Sequence[Generation],
    judge: SceneJudge | None,
    truth_key: str | None,
    best: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], list[dict]]:
    """Metrics of the chosen sample of each generation (``best``: which; default its own):
    with a judge, exact-scene accuracy overall and by object count plus per-attribute
    accuracy; for captioned rows with a retriever, R-precision among the rows' captions."""
    picks = list(best) if best is not None else [g.best for g in generations]
    chosen = [g.sample_codes[b] for g, b in zip(generations, picks, strict=True)]
    images = model.decode_ids([model.vocab.image_to_vocab(c) for c in chosen])
    records = [
        {
            "retrieved": [d.provenance() for d in generation.retrieved],
            "strategies": generation.strategies,
            "best_sample": pick,
            "image": image,
        }
        for image, generation, pick in zip(images, generations, picks, strict=True)
    ]
    metrics: dict[str, Any] = {"examples": len(rows)}
    if judge is not None:
        metrics.update(_exact_scene(rows, images, judge, truth_key, records))
    if model.retriever is not None and all("caption" in r for r in rows) and len(rows) > 1:
        text_emb = _caption_embeddings(model, rows)
        image_emb = model.retriever.embed_image(images)
        metrics.update(_r_precision(text_emb, image_emb, rows, seed))
        clip = clip_scores(text_emb, image_emb)
        metrics["clip_score_dual_encoder"] = float(np.mean(clip))
        metrics["clip_score_dual_encoder_ci95"] = mean_interval(clip, bounds=None)
    return metrics, records


def sample_correctness(
    model: MultimodalModel,
    rows: Sequence[dict],
    generations: Sequence[Generation],
    judge: SceneJudge,
    truth_key: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, samples)`` bool: whether each sample (not only the re-ranked one) shows its
    row's scene exactly — what the generator gets right before the re-ranker chooses — and
    ``(rows,)`` each row's object count."""
    codes = [c for g in generations for c in g.sample_codes]
    images = model.decode_ids([model.vocab.image_to_vocab(c) for c in codes])
    samples = len(generations[0].sample_codes) if generations else 0
    right = np.zeros((len(rows), samples), dtype=bool)
    objects = np.zeros(len(rows), dtype=int)
    for i, row in enumerate(rows):
        truth = judge.truth(row[truth_key])
        objects[i] = len(truth)
        for s in range(samples):
            right[i, s] = compare_scene(truth, judge.parse(images[i * samples + s])).exact
    return right, objects


def _exact_scene(rows, images, judge: SceneJudge, truth_key, records) -> dict[str, Any]:
    agreements, by_count, counted, any_right = [], {}, [], {}
    objects_right = objects_total = 0
    for row, image, record in zip(rows, images, records, strict=True):
        truth = judge.truth(row[truth_key])
        parsed = judge.parse(image)
        agreement = compare_scene(truth, parsed)
        agreements.append(agreement)
        by_count.setdefault(len(truth), []).append(agreement.exact)
        # Why a scene is wrong: the object count, and which true objects came out exactly.
        counted.append(len(parsed) == len(truth))
        exact_objects = sum(same_objects([t], [p]) for t in truth for p in parsed)
        objects_right, objects_total = objects_right + exact_objects, objects_total + len(truth)
        any_right.setdefault(len(truth), []).append(exact_objects > 0)
        record.update(correct=bool(agreement.exact), parsed=[o.__dict__ for o in parsed])
    summary = agreement_summary(agreements)
    exact = [a.exact for a in agreements]
    metrics: dict[str, Any] = {"accuracy": summary["exact_scene_rate"]}
    metrics["accuracy_ci95"] = wilson_interval(sum(exact), len(exact))
    for name in ("position", "shape", "color", "size"):
        metrics[f"{name}_accuracy"] = summary[f"{name}_accuracy"]
    metrics["object_count_accuracy"] = float(np.mean(counted)) if counted else 0.0
    metrics["objects_right"] = objects_right / max(objects_total, 1)
    for count, values in sorted(by_count.items()):
        metrics[f"accuracy_{count}_objects"] = float(np.mean(values))
        metrics[f"accuracy_{count}_objects_ci95"] = wilson_interval(sum(values), len(values))
        metrics[f"examples_{count}_objects"] = len(values)
        metrics[f"any_object_right_{count}_objects"] = float(np.mean(any_right[count]))
    return metrics


def _caption_embeddings(model: MultimodalModel, rows: Sequence[dict]) -> np.ndarray:
    texts = [model.vocab.vocab_to_text(model.codec.encode_text(r["caption"])) for r in rows]
    return model.retriever.embed_text(texts)


def _r_precision(text_emb, image_emb, rows, seed: int, prefix: str = "") -> dict[str, Any]:
    """R-precision of images for their rows' captions (distractors: the other rows' captions,
    drawn with a seed of their own, so generated and real images meet the same distractors)."""
    rng = np.random.default_rng([seed, 0x4B1])
    keys = [" ".join(r["caption"].lower().split()) for r in rows]
    hits, used = r_precision_hits(text_emb, image_emb, keys, R_PRECISION_CANDIDATES, rng)
    return {
        f"{prefix}r_precision": float(np.mean(hits)),
        f"{prefix}r_precision_ci95": wilson_interval(int(hits.sum()), len(hits)),
        "r_precision_candidates": used,
        "r_precision_chance": 1.0 / used,
    }


def feature_metrics(model, documents, generated, real_pixels, seed: int = 0) -> dict[str, Any]:
    """FID, CLIPScore and R-precision in the *dual encoder's* feature space (not Inception's)
    for the ``(N, H, W, 3)`` images generated for ``documents``, and the same three for the
    documents' real images (``real_*``: the ceiling; FID of the real images of the same
    prompts against every real test image, so both FIDs have the same sample size)."""
    real_own = np.stack([d["pixels"] for d in documents])
    image_emb = model.retriever.embed_image(generated)
    own_emb = model.retriever.embed_image(real_own)
    real_emb = model.retriever.embed_image(real_pixels)
    text_emb = _caption_embeddings(model, documents)
    clip_real = clip_scores(text_emb, own_emb)
    out = {
        "fid_dual_encoder": frechet_distance(image_emb, real_emb),
        "real_fid_dual_encoder": frechet_distance(own_emb, real_emb),
        "real_clip_score_dual_encoder": float(np.mean(clip_real)),
        "real_clip_score_dual_encoder_ci95": mean_interval(clip_real, bounds=None),
    }
    if len(documents) > 1:
        out.update(_r_precision(text_emb, own_emb, documents, seed, prefix="real_"))
    return out


def target_metrics(model, spec: TaskSpec, rows, generated: np.ndarray) -> dict[str, Any]:
    """How close each generated image is to its row's true image, with no judge: the dual
    encoder's cosine similarity (``target_similarity_dual_encoder``) and the pixel MSE on
    [0, 1] (``target_pixel_mse``), each beside a baseline that is not the task's answer: for a
    task that produces an image from an input image (editing) the input image unchanged, else
    (grounding) another row's true image (``baseline_*``)."""
    truth = np.stack([r[spec.image.column] if spec.image else r["pixels"] for r in rows])
    if spec.input_images:
        baseline = np.stack([r["pixels"] for r in rows])
    else:
        baseline = np.roll(truth, 1, axis=0)
    true_emb = model.retriever.embed_image(truth)
    out: dict[str, Any] = {}
    for prefix, images in (("", generated), ("baseline_", baseline)):
        similarity = row_cosines(model.retriever.embed_image(images), true_emb)
        mse = ((images.astype(np.float64) - truth.astype(np.float64)) / 255.0) ** 2
        mse = mse.reshape(len(rows), -1).mean(axis=1)
        out[f"{prefix}target_similarity_dual_encoder"] = float(similarity.mean())
        out[f"{prefix}target_similarity_dual_encoder_ci95"] = mean_interval(similarity, bounds=None)
        out[f"{prefix}target_pixel_mse"] = float(mse.mean())
    return out


def score_caption(model, spec: TaskSpec, documents, generations, judge, _pixels, _seed):
    """CIDEr-D / BLEU-4 against every reference caption (ShapeWorld: every paraphrase), and
    with a judge the attribute exact match (the caption parser reads the scene)."""
    predictions = {d["id"]: g.text for d, g in zip(documents, generations, strict=True)}
    references = {d["id"]: d["paraphrases"] for d in documents}
    metrics = caption_scores(predictions, references)
    metrics["references_per_image"] = float(np.mean([len(d["paraphrases"]) for d in documents]))
    records = [
        {
            "image_id": d["id"],
            "caption": g.text,
            "retrieved": [r.provenance() for r in g.retrieved],
        }
        for d, g in zip(documents, generations, strict=True)
    ]
    if judge is not None:
        exact = []
        for d, g, record in zip(documents, generations, records, strict=True):
            exact.append(same_objects(judge.truth(d[spec.truth]), judge.parse_caption(g.text)))
            record["correct"] = exact[-1]
        metrics["attribute_exact_match"] = float(np.mean(exact))
        metrics["attribute_exact_match_ci95"] = wilson_interval(sum(exact), len(exact))
    metrics["examples"] = len(documents)
    return metrics, records


def score_vqa(model, spec: TaskSpec, rows, generations, _judge, _pixels, _seed):
    """The official VQA accuracy against the row's ten human answers (VQAv2 files); a row with
    fewer reference answers (ShapeWorld's one exact answer, a manifest's list) is right when the
    answer matches any of them, as ten agreeing annotators would make it."""
    scores, by_type, records = [], {}, []
    for r, g in zip(rows, generations, strict=True):
        answers = r.get("answers") or [r[spec.truth]]
        if len(answers) == 10:
            score = vqa_accuracy(g.text, answers)
        else:
            score = max(vqa_accuracy(g.text, [a] * 10) for a in answers)
        scores.append(score)
        if r["question_type"]:  # a user's manifest may leave it empty
            by_type.setdefault(r["question_type"], []).append(score)
        records.append(
            {
                "image_id": r["image_id"],
                "question": r["question"],
                "answer": g.text,
                "truth": r[spec.truth],
                "correct": score == 1.0,
            }
        )
    metrics = {"accuracy": float(np.mean(scores)), "examples": len(rows)}
    if all(s in (0.0, 1.0) for s in scores):  # every score 0 or 1: a proportion
        metrics["accuracy_ci95"] = wilson_interval(sum(scores), len(scores))
    else:  # ten-annotator credit (0.3, 0.6, ...): a mean
        metrics["accuracy_ci95"] = mean_interval(scores)
    metrics.update({f"accuracy_{t}": float(np.mean(v)) for t, v in sorted(by_type.items())})
    return metrics, records


def score_mask_iou(model, spec: TaskSpec, rows, generations, _judge, _pixels, _seed):
    """IoU of the generated mask, binarized, with the true mask."""
    images = model.decode_ids([model.vocab.image_to_vocab(g.codes) for g in generations])
    ious, records = [], []
    for r, image, g in zip(rows, images, generations, strict=True):
        iou = mask_iou(binarize_mask(image), r[spec.image.column] > 127)
        ious.append(iou)
        records.append(
            {
                "image_id": r["image_id"],
                "instruction": r[spec.input_texts[0]],
                "iou": iou,
                "image": image,
                "retrieved": [d.provenance() for d in g.retrieved],
            }
        )
    metrics = {"mean_iou": float(np.mean(ious)), "examples": len(rows)}
    metrics["mean_iou_ci95"] = mean_interval(ious)
    return metrics, records


# TaskSpec.scorer -> scorer(model, spec, rows, generations, judge, real_pixels, seed).
SCORERS = {
    "scene": score_scene,
    "caption": score_caption,
    "vqa": score_vqa,
    "mask_iou": score_mask_iou,
}
