"""The ``evaluate`` stage's library half: every task, every study, every predictions file.

Runs on a seeded sample of the test split (``evaluate.prompts`` captions, ``task_examples``
rows per task) for the pretrain and SFT models — and, when given, the no-retrieval pretraining
baseline — and writes ``out_dir`` atomically::

    metrics.json                      headline numbers per model and task (+ the best study row)
    tables/<study>.csv|.json          cfg_weight, samples, retrieved_docs, ra_vs_no_retrieval,
                                      pretrain_vs_sft
    plots/<study>.png                 the same tables as figures
    samples/<model>_text_to_image.png prompts' true image, then the model's samples (grid)
    samples/tasks.png                 one row per image task: input, target, pretrain, SFT
    generations/<model>/<task>/*.png  every generated image, one PNG each, and manifest.json
                                      (prompt, correctness, retrieved documents, strategy, seed)
    predictions/<model>_captions.json COCO caption results format [{"image_id", "caption"}]
    predictions/<model>_vqa.json      [{"image_id", "question", "answer"}]

Studies use the SFT model (the final model) except the retrieval study, which needs the
retrieval-augmented pretrained model. FID and CLIPScore are computed in the dual encoder's
feature space and named so (``fid_dual_encoder``); Inception FID is added when
``evaluate.inception_weights`` points to local Inception-v3 weights.
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
from cm3leon.config import DataConfig, EvaluateConfig
from cm3leon.data.shapeworld_parser import ShapeWorldParser
from cm3leon.evaluation import studies
from cm3leon.evaluation.inception import inception_features, load_inception
from cm3leon.evaluation.metrics import frechet_distance
from cm3leon.evaluation.tasks import (
    SceneJudge,
    answer_strategy,
    load_test_set,
    score_task,
    strategies,
)
from cm3leon.inference.multimodal import MultimodalModel
from cm3leon.tasks import TASKS

Log = Callable[[str], None]


def evaluate(
    models: dict[str, MultimodalModel],
    corpus_dir: str | Path,
    tokens_dir: str | Path,
    data_config: DataConfig,
    config: EvaluateConfig,
    seed: int,
    out_dir: str | Path,
    log: Log = print,
) -> dict[str, Any]:
    """``models``: ``pretrain`` and ``sft`` (required), ``pretrain_no_retrieval`` (optional)."""
    if data_config.source != "shapeworld":
        raise ValueError(
            "the evaluate stage scores generations exactly with the ShapeWorld parser; "
            f"data.source is {data_config.source!r} (use the CLI to generate on other data)"
        )
    sft, pretrain = models["sft"], models["pretrain"]
    shapeworld = data_config.shapeworld
    parser = ShapeWorldParser.from_config(shapeworld, data_config.image_size)
    judge = SceneJudge(parser, shapeworld)
    test = load_test_set(
        corpus_dir, tokens_dir, sft.codec.decode_text, config.prompts, config.task_examples, seed
    )
    decoding = config.decoding
    headline = strategies(decoding, decoding.strategy, decoding.samples, decoding.cfg_weight)
    answer = answer_strategy(decoding)
    retrieved = {"pretrain": config.retrieved, "sft": config.sft_retrieved}
    retrieved["pretrain_no_retrieval"] = 0

    metrics: dict[str, Any] = {}
    records: dict[str, dict[str, list]] = {}
    inception = load_inception(config.inception_weights) if config.inception_weights else None
    for name, model in models.items():
        k = retrieved[name]
        tick = time.perf_counter()
        metrics[name], records[name] = {}, {}
        # The no-retrieval baseline serves the retrieval study: text-to-image only.
        specs = [TASKS["text_to_image"]] if name == "pretrain_no_retrieval" else TASKS.values()
        for spec in specs:
            rows = test.documents if spec.table is None else test.tasks[spec.name]
            # Text-conditioned image tasks draw the headline plan's samples and re-rank them;
            # a task with a single right output gets one answer sample.
            plan = headline if spec.query is not None else answer
            real = test.real_pixels if spec.table is None and spec.output == "image" else None
            result, rec = score_task(model, spec, rows, judge, plan, k, seed, real)
            if inception is not None and real is not None:
                generated = np.stack([r["image"] for r in rec])
                result["fid_inception"] = frechet_distance(
                    inception_features(inception, generated),
                    inception_features(inception, real),
                )
            metrics[name][spec.name], records[name][spec.name] = result, rec
        log(
            f"{name}: "
            + ", ".join(f"{t} {_headline(t, v):.3f}" for t, v in metrics[name].items())
            + f" ({time.perf_counter() - tick:.0f}s)"
        )

    prompts = test.documents[: config.studies.prompts]
    study = config.studies
    tables: dict[str, list[dict]] = {}
    tick = time.perf_counter()
    tables["cfg_weight"] = studies.cfg_study(
        sft,
        prompts,
        parser,
        decoding,
        study.cfg_weights,
        study.strategies,
        max(2, decoding.samples // 2),
        config.sft_retrieved,
        seed,
    )
    log(f"cfg study ({time.perf_counter() - tick:.0f}s)")
    tick = time.perf_counter()
    tables["samples"] = studies.samples_study(
        sft, prompts, parser, decoding, study.samples, config.sft_retrieved, seed
    )
    tables["retrieved_docs"] = studies.retrieval_study(
        pretrain, prompts, parser, decoding, study.retrieved, seed
    )
    log(f"samples and retrieval studies ({time.perf_counter() - tick:.0f}s)")
    tables["pretrain_vs_sft"] = [
        {
            "task": task,
            "metric": TASKS[task].headline,
            "pretrain": round(_headline(task, metrics["pretrain"][task]), 4),
            "sft": round(_headline(task, metrics["sft"][task]), 4),
            **_headline_interval(task, "pretrain", metrics["pretrain"][task]),
            **_headline_interval(task, "sft", metrics["sft"][task]),
        }
        for task in metrics["sft"]
    ]
    if "pretrain_no_retrieval" in models:
        tables["ra_vs_no_retrieval"] = [
            {
                "model": name,
                "retrieved_at_inference": retrieved[name],
                **_t2i_row(metrics[name]["text_to_image"]),
            }
            for name in ("pretrain", "pretrain_no_retrieval")
        ]
    best = max(tables["cfg_weight"], key=lambda r: r["accuracy"])
    no_cfg = {r["strategy"]: r["accuracy"] for r in tables["cfg_weight"] if r["cfg_weight"] == 1.0}
    metrics["best_text_to_image"] = {**best, "no_cfg_same_strategy": no_cfg.get(best["strategy"])}

    with atomic_dir(out_dir) as tmp:
        _write_tables(tmp, tables)
        _write_generations(tmp, models, test, records, decoding, seed, retrieved)
        _write_grids(tmp, models, test, records, config.grid_examples)
        (tmp / "metrics.json").write_text(
            json.dumps(_jsonable(metrics), indent=2, sort_keys=True) + "\n"
        )
    return metrics  # no wall-clock time inside out_dir: same seed, same bytes


def _headline(task: str, task_metrics: dict) -> float:
    return float(task_metrics[TASKS[task].headline])


def _headline_interval(task: str, model: str, task_metrics: dict) -> dict:
    low, high = task_metrics.get(f"{TASKS[task].headline}_ci95", (None, None))
    if low is None:
        return {}
    return {f"{model}_low": round(low, 4), f"{model}_high": round(high, 4)}


def _t2i_row(m: dict) -> dict:
    keys = (
        "accuracy",
        "accuracy_1_objects",
        "accuracy_2_objects",
        "fid_dual_encoder",
        "clip_score_dual_encoder",
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
    if name == "cfg_weight":
        for strategy in dict.fromkeys(r["strategy"] for r in rows):
            sub = [r for r in rows if r["strategy"] == strategy]
            axis.errorbar(
                [r["cfg_weight"] for r in sub],
                [r["accuracy"] for r in sub],
                _error_bars(sub),
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
            [r["accuracy"] for r in rows],
            _error_bars(rows),
            fmt="o-",
            capsize=3,
        )
        axis.set_xlabel(
            "samples per prompt (re-ranked)" if x == "samples" else "retrieved documents"
        )
    else:
        labels = [r.get("task", r.get("model")) for r in rows]
        keys = ["pretrain", "sft"] if name == "pretrain_vs_sft" else ["accuracy"]
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            axis.bar(np.arange(len(rows)) + j * width, [r[key] for r in rows], width, label=key)
        axis.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, labels, rotation=20, fontsize=7)
        axis.legend()
    axis.set_ylabel("accuracy / IoU" if name == "pretrain_vs_sft" else "text-to-image accuracy")
    axis.set_ylim(0, 1.02)
    axis.set_title(name.replace("_", " "))


def _error_bars(rows: list[dict]):
    """95% interval of each row's accuracy as matplotlib's (below, above) error bars."""
    if not all("accuracy_low" in r for r in rows):
        return None
    below = [max(r["accuracy"] - r["accuracy_low"], 0.0) for r in rows]
    above = [max(r["accuracy_high"] - r["accuracy"], 0.0) for r in rows]
    return np.array([below, above])


def _write_generations(out, models, test, records, decoding, seed, retrieved) -> None:
    (out / "predictions").mkdir()
    for name in models:
        for task, rows in records[name].items():
            if TASKS[task].output == "text":  # predictions files below, no images
                continue
            folder = out / "generations" / name / task
            folder.mkdir(parents=True)
            source = test.documents if task == "text_to_image" else test.tasks[task]
            manifest = []
            for i, (row, record) in enumerate(zip(source, rows, strict=True)):
                file = f"{i:04d}.png"
                write_png(folder / file, record["image"])
                entry = {k: v for k, v in record.items() if k != "image"}
                entry.update(
                    file=file,
                    source_id=row.get("id", row.get("image_id")),
                    prompt=row.get("caption", row.get("instruction", row.get("prompt"))),
                    model=name,
                    seed=seed,
                    retrieved_k=retrieved[name],
                )
                manifest.append(entry)
            (folder / "manifest.json").write_text(json.dumps(_jsonable(manifest), indent=1) + "\n")
        if "captioning" in records[name]:
            captions = [
                {"image_id": r["image_id"], "caption": r["caption"]}
                for r in records[name]["captioning"]
            ]
            (out / "predictions" / f"{name}_captions.json").write_text(
                json.dumps(captions, indent=1) + "\n"
            )
            answers = [
                {"image_id": r["image_id"], "question": r["question"], "answer": r["answer"]}
                for r in records[name]["vqa"]
            ]
            (out / "predictions" / f"{name}_vqa.json").write_text(
                json.dumps(answers, indent=1) + "\n"
            )


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
    rows = []
    for task in (s.name for s in TASKS.values() if s.output == "image" and s.table is not None):
        examples = test.tasks[task][:count]
        if not examples:
            continue
        rows.append(np.stack([r["pixels"] for r in examples]))
        for name in ("pretrain", "sft"):
            rows.append(np.stack([r["image"] for r in records[name][task][:count]]))
    if rows:
        width = max(len(r) for r in rows)
        rows = [
            np.concatenate([r, np.zeros((width - len(r), *r.shape[1:]), np.uint8)]) for r in rows
        ]
        write_png(out / "samples" / "tasks.png", image_grid(rows, scale=3))
