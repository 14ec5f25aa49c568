"""The ``evaluate`` stage's library half: every task, every study, every predictions file.

Runs on a seeded sample of the test split (``evaluate.prompts`` captions, ``task_examples``
rows per task) for the pretrain and SFT models — and, when given, the no-retrieval pretraining
baseline — and writes ``out_dir`` atomically::

    metrics.json                      headline numbers per model and task (+ the best study row)
    tables/<study>.csv|.json          cfg_weight, samples, retrieved_docs, ra_vs_no_retrieval,
                                      pretrain_vs_sft
    plots/<study>.png                 the same tables as figures
    samples/<model>_text_to_image.png prompts' true image, then the model's samples (grid)
    samples/tasks.png|.json           rows per image task: input (if any), target, pretrain,
                                      SFT output; the JSON names each row
    samples/infilling.png             true images, then each model's infilled middle rows
    generations/<model>/<task>/*.png  every generated image, one PNG each, and manifest.json
                                      (prompt, correctness, retrieved documents, strategy, seed)
    generations/pretrain/retrieved_docs/  the retrieval study's images at its most retrieved
                                      documents, with each prompt's documents (ids, scores)
    predictions/<model>_captions.json COCO caption results format [{"image_id", "caption"}]
    predictions/<model>_vqa.json      [{"image_id", "question", "answer"}]

Image samples are re-ranked by whatever each model was given
(:meth:`~cm3leon.inference.multimodal.MultimodalModel.rerank_with`; the stage gives every
model the SFT model as captioner), recorded under ``rerank`` in ``metrics.json``.
Studies use the SFT model (the final model) except the retrieval study, which needs the
retrieval-augmented pretrained model. FID, CLIPScore and R-precision are computed in the dual
encoder's feature space and named so (``fid_dual_encoder``), each beside its value for the real
test images (``real_*``, the ceiling); Inception FID is added when
``evaluate.inception_weights`` points to local Inception-v3 weights.

Any corpus: the exact metrics (``accuracy``, ``attribute_exact_match``, ...) are added when the
corpus has a scene judge (ShapeWorld); without one the headline of text-to-image is
R-precision and of captioning CIDEr-D (:func:`cm3leon.tasks.headline_metric`), the studies are
read by R-precision, and ``metrics.json`` lists under ``skipped`` each task it could not score
and why (user data has no task tables, so only text-to-image and captioning are scored).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon.artifacts import atomic_dir, image_grid, write_png
from cm3leon.config import EvaluateConfig
from cm3leon.data.scene_judge import load_judge
from cm3leon.evaluation import studies
from cm3leon.evaluation.inception import inception_features, load_inception
from cm3leon.evaluation.infilling import infilling_metrics
from cm3leon.evaluation.metrics import frechet_distance
from cm3leon.evaluation.tasks import (
    answer_strategy,
    load_test_set,
    score_task,
    task_plan,
)
from cm3leon.inference.multimodal import MultimodalModel
from cm3leon.tasks import TASKS, headline_metric

Log = Callable[[str], None]

# Samples per prompt in the CFG and retrieval studies: 2, the fewest that let the mix alternate
# top-p and CD-K. Half the generation of 4 (the default run's evaluate stage 543 s against
# 761 s), and the re-ranker hides less of what a setting does to the generator: on the SFT
# model, 800 test prompts, top-p at CFG 1.5 minus 1, paired, re-ranked among the first n of one
# 8-sample draw per weight, +0.085 [+0.054, +0.116] at n = 1, +0.0725 at 2, +0.046 at 4,
# +0.0125 [-0.015, +0.040] at 8 (the stage's own 2-sample cells, other random numbers: +0.039
# [+0.009, +0.069]). The samples study measures the re-ranking itself, at the headline setting.
STUDY_SAMPLES = 2


def evaluate(
    models: dict[str, MultimodalModel],
    corpus_dir: str | Path,
    tokens_dir: str | Path,
    config: EvaluateConfig,
    seed: int,
    out_dir: str | Path,
    log: Log = print,
) -> dict[str, Any]:
    """``models``: ``pretrain`` and ``sft`` (required), ``pretrain_no_retrieval`` (optional).

    The corpus's scene judge (:func:`~cm3leon.data.scene_judge.load_judge`) adds the exact
    metrics; without one (user data) every task and study runs on the generic metrics, and a
    task with no test rows or no metric without a judge is listed under ``skipped``."""
    missing = [name for name in ("pretrain", "sft") if name not in models]
    if missing:
        raise ValueError(f"evaluate needs the {' and '.join(missing)} model(s)")
    sft = models["sft"]
    judge = load_judge(corpus_dir)
    test = load_test_set(
        corpus_dir, tokens_dir, sft.codec.decode_text, config.prompts, config.task_examples, seed
    )
    decoding = config.decoding
    answer = answer_strategy(decoding)
    retrieved = {"pretrain": config.retrieved, "sft": config.sft_retrieved}
    retrieved["pretrain_no_retrieval"] = 0

    metrics: dict[str, Any] = {"judge": "shapeworld" if judge is not None else None}
    # How each model's image samples are re-ranked: the dual encoder's logit, plus the caption
    # weight times log p(prompt | sample) under the captioner (a model named here, or none).
    metrics["rerank"] = {
        name: {
            "captioner": next((n for n, m in models.items() if m is model.captioner), None),
            "caption_weight": model.caption_weight,
        }
        for name, model in models.items()
    }
    skipped = _skipped_tasks(test, judge is not None)
    if skipped:
        metrics["skipped"] = skipped
        log("not scored: " + "; ".join(f"{t} ({why})" for t, why in skipped.items()))
    scored = [spec for spec in TASKS.values() if spec.name not in skipped]
    records: dict[str, dict[str, list]] = {}
    inception = load_inception(config.inception_weights) if config.inception_weights else None
    study = config.studies
    study_samples = STUDY_SAMPLES  # per prompt in the CFG and retrieval studies
    # One pool of text-to-image draws per model: a setting the headline and a study share is
    # generated once, with the most samples either needs (the headline's first `samples`).
    pools = {
        name: studies.TextToImagePool(model, test.documents, decoding, seed)
        for name, model in models.items()
    }
    # before the headline draws it: the samples study's 8 serve the SFT headline's 4 too
    pools["sft"].reserve(
        decoding.strategy, decoding.cfg_weight, config.sft_retrieved, max(study.samples)
    )
    for name, model in models.items():
        k = retrieved[name]
        tick = time.perf_counter()
        metrics[name], records[name] = {}, {}
        # The no-retrieval baseline serves the retrieval study: text-to-image only.
        specs = [TASKS["text_to_image"]] if name == "pretrain_no_retrieval" else scored
        for spec in specs:
            rows = test.documents if spec.table is None else test.tasks[spec.name]
            # Text-to-image draws the headline plan's samples and re-ranks them; captioning
            # draws evaluate.decoding.caption_samples captions, re-ranked by the image they
            # predict; a task with a single right output gets one answer sample, guided when
            # SFT trains its unconditional stream (tasks.task_plan).
            plan = task_plan(decoding, spec)
            real = test.real_pixels if spec.table is None and spec.output == "image" else None
            drawn = None
            if spec.name == "text_to_image":
                drawn = pools[name].get(
                    decoding.strategy, decoding.cfg_weight, k, decoding.samples, len(rows)
                )
            result, rec = score_task(model, spec, rows, judge, plan, k, seed, real, drawn)
            if inception is not None and real is not None:
                generated = np.stack([r["image"] for r in rec])
                result["fid_inception"] = frechet_distance(
                    inception_features(inception, generated),
                    inception_features(inception, real),
                )
            metrics[name][spec.name], records[name][spec.name] = result, rec
        judged = judge is not None
        log(
            f"{name}: "
            + ", ".join(
                f"{t} {headline_metric(TASKS[t], judged)} {_headline(t, v, judged):.3f}"
                for t, v in metrics[name].items()
            )
            + f" ({time.perf_counter() - tick:.0f}s)"
        )

    # Beside the task registry, generic on any data: CM3 infilling of the middle image rows
    # (the answer strategy, one sample). The retriever's recall@k is the index stage's.
    infill_docs = test.documents[: config.task_examples]
    metrics["infilling"], infill_records = {}, {}
    for name in ("pretrain", "sft"):
        tick = time.perf_counter()
        result, infill_records[name] = infilling_metrics(
            models[name], infill_docs, answer[0], judge, seed
        )
        metrics["infilling"][name] = result
        log(
            f"{name}: infilling region MSE {result['region_mse']:.4f} (spliced baseline "
            f"{result['spliced_region_mse']:.4f}) ({time.perf_counter() - tick:.0f}s)"
        )

    count = min(study.prompts, len(test.documents))
    tables: dict[str, list[dict]] = {}
    tick = time.perf_counter()
    tables["cfg_weight"] = studies.cfg_study(
        pools["sft"],
        count,
        judge,
        study.cfg_weights,
        study.strategies,
        study_samples,
        config.sft_retrieved,
    )
    log(f"cfg study ({time.perf_counter() - tick:.0f}s)")
    tick = time.perf_counter()
    tables["samples"] = studies.samples_study(
        pools["sft"], count, judge, study.samples, config.sft_retrieved
    )
    tables["retrieved_docs"], retrieval_records = studies.retrieval_study(
        pools["pretrain"], count, judge, study.retrieved, study_samples
    )
    log(f"samples and retrieval studies ({time.perf_counter() - tick:.0f}s)")
    log(
        "text-to-image samples drawn: "
        + ", ".join(f"{name} {pool.rows_generated}" for name, pool in pools.items())
    )
    judged = judge is not None
    tables["pretrain_vs_sft"] = [
        {
            "task": task,
            "metric": headline_metric(TASKS[task], judged),
            "pretrain": round(_headline(task, metrics["pretrain"][task], judged), 4),
            "sft": round(_headline(task, metrics["sft"][task], judged), 4),
            **_headline_interval(task, "pretrain", metrics["pretrain"][task], judged),
            **_headline_interval(task, "sft", metrics["sft"][task], judged),
            # SFT minus pretrain on the same test rows, where rows are scored right or wrong
            **studies.paired_columns(
                records["sft"][task], records["pretrain"][task], "sft_minus_pretrain"
            ),
        }
        for task in metrics["sft"]
    ]
    if "pretrain_no_retrieval" in models:
        tables["ra_vs_no_retrieval"] = [
            {
                "model": name,
                "retrieved_at_inference": retrieved[name],
                **_t2i_row(metrics[name]["text_to_image"]),
                # this model minus the no-retrieval baseline, prompt by prompt
                **studies.paired_columns(
                    records[name]["text_to_image"],
                    records["pretrain_no_retrieval"]["text_to_image"],
                    "minus_no_retrieval",
                ),
            }
            for name in ("pretrain", "pretrain_no_retrieval")
        ]
    key = studies.primary_metric(tables["cfg_weight"])
    best = max(tables["cfg_weight"], key=lambda r: r[key])
    no_cfg = {r["strategy"]: r[key] for r in tables["cfg_weight"] if r["cfg_weight"] == 1.0}
    metrics["best_text_to_image"] = {
        **best,
        "metric": key,
        "no_cfg_same_strategy": no_cfg.get(best["strategy"]),
    }

    for name in ("cfg_weight", "samples", "retrieved_docs", "ra_vs_no_retrieval"):
        if name in tables:  # the column dvc.yaml's plots read on any corpus
            tables[name] = studies.with_headline(tables[name])
    with atomic_dir(out_dir) as tmp:
        _write_tables(tmp, tables)
        _write_generations(tmp, models, test, records, decoding, seed, retrieved)
        # The retrieval study's generations at its most documents: what each prompt retrieved
        # from the memory bank (ids, scores), for the report's thumbnails and for auditors.
        _write_image_records(
            tmp / "generations" / "pretrain" / "retrieved_docs",
            test.documents[:count],
            retrieval_records,
            "pretrain",
            seed,
            max(study.retrieved),
        )
        _write_grids(tmp, models, test, records, config.grid_examples)
        _write_infilling_grid(tmp, infill_docs, infill_records, config.grid_examples)
        (tmp / "metrics.json").write_text(
            json.dumps(_jsonable(metrics), indent=2, sort_keys=True) + "\n"
        )
    return metrics  # no wall-clock time inside out_dir: same seed, same bytes


def _skipped_tasks(test, judged: bool) -> dict[str, str]:
    """Tasks that cannot be scored on this test set, with the reason."""
    skipped = {}
    for spec in TASKS.values():
        rows = test.documents if spec.table is None else test.tasks[spec.name]
        if not rows:
            skipped[spec.name] = f"no test rows in task table {spec.table!r}"
        elif headline_metric(spec, judged) is None:
            skipped[spec.name] = "its metric needs a scene judge, and this corpus has none"
    return skipped


def _headline(task: str, task_metrics: dict, judged: bool) -> float:
    return float(task_metrics[headline_metric(TASKS[task], judged)])


def _headline_interval(task: str, model: str, task_metrics: dict, judged: bool) -> dict:
    key = headline_metric(TASKS[task], judged)
    low, high = task_metrics.get(f"{key}_ci95", (None, None))
    if low is None:
        return {}
    return {f"{model}_low": round(low, 4), f"{model}_high": round(high, 4)}


def _t2i_row(m: dict) -> dict:
    keys = (
        "accuracy",
        "accuracy_1_objects",
        "accuracy_2_objects",
        "r_precision",
        "real_r_precision",
        "fid_dual_encoder",
        "real_fid_dual_encoder",
        "clip_score_dual_encoder",
        "real_clip_score_dual_encoder",
    )
    return {**{k: round(float(m[k]), 4) for k in keys if k in m}, **studies.interval_columns(m)}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def _write_tables(out: Path, tables: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "tables").mkdir()
    (out / "plots").mkdir()
    for name, rows in tables.items():
        buffer = io.StringIO()
        columns = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (out / "tables" / f"{name}.csv").write_text(buffer.getvalue())
        (out / "tables" / f"{name}.json").write_text(json.dumps(_jsonable(rows), indent=2) + "\n")
        figure, axis = plt.subplots(figsize=(5, 3.2), dpi=100)
        _plot(axis, name, rows)
        figure.tight_layout()
        figure.savefig(out / "plots" / f"{name}.png", metadata={"Software": None})
        plt.close(figure)


def _plot(axis, name: str, rows: list[dict]) -> None:
    key = studies.primary_metric(rows)
    if name == "cfg_weight":
        for strategy in dict.fromkeys(r["strategy"] for r in rows):
            sub = [r for r in rows if r["strategy"] == strategy]
            axis.errorbar(
                [r["cfg_weight"] for r in sub],
                [r[key] for r in sub],
                _error_bars(sub, key),
                fmt="o-",
                capsize=3,
                label=strategy,
            )
        axis.set_xlabel("CFG weight")
        axis.legend()
    elif name in ("samples", "retrieved_docs"):
        x = "samples" if name == "samples" else "retrieved"
        axis.errorbar(
            [r[x] for r in rows],
            [r[key] for r in rows],
            _error_bars(rows, key),
            fmt="o-",
            capsize=3,
        )
        axis.set_xlabel(
            "samples per prompt (re-ranked)" if x == "samples" else "retrieved documents"
        )
    else:
        labels = [r.get("task", r.get("model")) for r in rows]
        keys = ["pretrain", "sft"] if name == "pretrain_vs_sft" else [key]
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            axis.bar(np.arange(len(rows)) + j * width, [r[key] for r in rows], width, label=key)
        axis.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, labels, rotation=20, fontsize=7)
        axis.legend()
    if name == "pretrain_vs_sft":
        axis.set_ylabel("headline metric (see table)")
    else:
        axis.set_ylabel(
            "text-to-image accuracy" if key == "accuracy" else "text-to-image R-precision"
        )
    if name != "pretrain_vs_sft" or all(r["pretrain"] <= 1 and r["sft"] <= 1 for r in rows):
        axis.set_ylim(0, 1.02)  # CIDEr-D, the generic captioning headline, goes above 1
    axis.set_title(name.replace("_", " "))


def _error_bars(rows: list[dict], key: str):
    """95% interval of each row's ``key`` as matplotlib's (below, above) error bars."""
    if not all(f"{key}_low" in r for r in rows):
        return None
    below = [max(r[key] - r[f"{key}_low"], 0.0) for r in rows]
    above = [max(r[f"{key}_high"] - r[key], 0.0) for r in rows]
    return np.array([below, above])


def _write_generations(out, models, test, records, decoding, seed, retrieved) -> None:
    (out / "predictions").mkdir()
    for name in models:
        for task, rows in records[name].items():
            if TASKS[task].output == "text":  # predictions files below, no images
                continue
            source = test.documents if task == "text_to_image" else test.tasks[task]
            _write_image_records(
                out / "generations" / name / task, source, rows, name, seed, retrieved[name]
            )
        if "captioning" in records[name]:
            captions = [
                {"image_id": r["image_id"], "caption": r["caption"]}
                for r in records[name]["captioning"]
            ]
            (out / "predictions" / f"{name}_captions.json").write_text(
                json.dumps(captions, indent=1) + "\n"
            )
        if "vqa" in records[name]:
            answers = [
                {"image_id": r["image_id"], "question": r["question"], "answer": r["answer"]}
                for r in records[name]["vqa"]
            ]
            (out / "predictions" / f"{name}_vqa.json").write_text(
                json.dumps(answers, indent=1) + "\n"
            )


def _write_image_records(folder: Path, source, records, model: str, seed: int, k: int) -> None:
    """One PNG per generated image and ``manifest.json``: per image its file, the source row's
    id, the prompt, the model, seed, retrieved-document count and the record's fields (the
    retrieved documents' ids, captions and scores, strategies, correctness)."""
    folder.mkdir(parents=True)
    manifest = []
    for i, (row, record) in enumerate(zip(source, records, strict=True)):
        file = f"{i:04d}.png"
        write_png(folder / file, record["image"])
        entry = {key: v for key, v in record.items() if key != "image"}
        entry.update(
            file=file,
            source_id=row.get("id", row.get("image_id")),
            prompt=row.get("caption", row.get("instruction", row.get("prompt"))),
            model=model,
            seed=seed,
            retrieved_k=k,
        )
        manifest.append(entry)
    (folder / "manifest.json").write_text(json.dumps(_jsonable(manifest), indent=1) + "\n")


def _write_grids(out, models, test, records, count) -> None:
    (out / "samples").mkdir()
    truth = test.documents[:count]
    for name in models:
        shown = records[name]["text_to_image"][:count]
        real = np.stack([d["pixels"] for d in truth])
        generated = np.stack([r["image"] for r in shown])
        write_png(
            out / "samples" / f"{name}_text_to_image.png", image_grid([real, generated], scale=3)
        )
    # samples/tasks.png: per image-output task with a test table, its input image (when the
    # task reads one), the target, the pretrained and the SFT model's output; tasks.json names
    # each row of the grid (task, role) so the report labels it without knowing the layout.
    rows, labels = [], []
    for spec in (s for s in TASKS.values() if s.output == "image" and s.table is not None):
        examples = test.tasks[spec.name][:count]
        if not examples or spec.name not in records["sft"]:
            continue
        document = np.stack([r["pixels"] for r in examples])
        if spec.image is None:  # the task draws its document's image (grounding)
            rows.append(document)
            labels.append({"task": spec.name, "row": "target"})
        else:
            rows.append(document)
            labels.append({"task": spec.name, "row": "input"})
            rows.append(np.stack([_rgb(r[spec.image.column]) for r in examples]))
            labels.append({"task": spec.name, "row": "target"})
        for name in ("pretrain", "sft"):
            rows.append(np.stack([_rgb(r["image"]) for r in records[name][spec.name][:count]]))
            labels.append({"task": spec.name, "row": f"{name} output"})
    if rows:
        width = max(len(r) for r in rows)
        rows = [
            np.concatenate([r, np.zeros((width - len(r), *r.shape[1:]), np.uint8)]) for r in rows
        ]
        write_png(out / "samples" / "tasks.png", image_grid(rows, scale=3))
        (out / "samples" / "tasks.json").write_text(json.dumps(labels, indent=1) + "\n")


def _rgb(image: np.ndarray) -> np.ndarray:
    """An ``(H, W)`` mask as ``(H, W, 3)``, so it shares a grid with RGB images."""
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def _write_infilling_grid(out, documents, records, count) -> None:
    """``samples/infilling.png``: the true images, then each model's infill of their middle
    rows (rows follow ``records``' model order)."""
    rows = [np.stack([d["pixels"] for d in documents[:count]])]
    rows += [np.stack([r["image"] for r in recs[:count]]) for recs in records.values()]
    write_png(out / "samples" / "infilling.png", image_grid(rows, scale=3))
