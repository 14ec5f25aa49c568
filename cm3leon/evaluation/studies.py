"""The paper's studies in miniature (CM3Leon Table 1, Fig. 4, Table 2; DESIGN.md §10).

Each study returns a table: a list of flat dicts (one row per setting), written as CSV and JSON
and plotted by :mod:`cm3leon.evaluation.evaluate`:

- :func:`cfg_study` — text-to-image accuracy vs CFG weight, for top-p, CD-K and their mix
  (every strategy draws the same number of samples per prompt, re-ranked, so the comparison is
  fair; ``mix`` alternates the two);
- :func:`samples_study` — accuracy vs samples per prompt with dual-encoder re-ranking: one run
  of ``max(samples)`` samples, re-ranked among its first ``n`` for each ``n``;
- :func:`retrieval_study` — accuracy vs retrieved documents at inference (0/1/2) for the
  retrieval-augmented pretrained model, at the CFG study's samples per prompt;
- :func:`model_comparison` — the same prompts through several models (retrieval-augmented vs
  no-retrieval pretraining; pretrain vs SFT on every task is assembled by the evaluator).

Every row carries the generic metrics (R-precision and CLIPScore in the dual encoder's space)
and, when the corpus has a scene judge, the exact ones (``accuracy`` and its breakdown);
:func:`primary_metric` names the column a study is read by.
"""

from __future__ import annotations

from collections.abc import Sequence

from cm3leon.config import DecodingConfig
from cm3leon.data.scene_judge import SceneJudge
from cm3leon.evaluation.tasks import image_metrics, strategies
from cm3leon.inference.multimodal import MultimodalModel, TaskInput, rerank_prefix


def _row(metrics: dict, **setting) -> dict:
    keep = (
        "accuracy",
        "accuracy_1_objects",
        "accuracy_2_objects",
        "color_accuracy",
        "shape_accuracy",
        "size_accuracy",
        "position_accuracy",
        "r_precision",
        "clip_score_dual_encoder",
    )
    row = {**setting, **{k: round(float(metrics[k]), 4) for k in keep if k in metrics}}
    return {**row, **interval_columns(metrics)}


def interval_columns(metrics: dict) -> dict:
    """``accuracy_low``/``accuracy_high`` (95% Wilson) and the examples behind them, the
    columns every accuracy table carries; per object count too when the metrics have them."""
    columns = {}
    for key in ("accuracy", "accuracy_1_objects", "accuracy_2_objects", "r_precision"):
        if f"{key}_ci95" in metrics:
            low, high = metrics[f"{key}_ci95"]
            columns[f"{key}_low"], columns[f"{key}_high"] = round(low, 4), round(high, 4)
    columns["examples"] = metrics.get("examples")
    return columns


def primary_metric(rows: Sequence[dict]) -> str:
    """The column a text-to-image table is read by: exact ``accuracy`` when judged, else
    ``r_precision``."""
    return "accuracy" if rows and "accuracy" in rows[0] else "r_precision"


def cfg_study(
    model: MultimodalModel,
    documents: Sequence[dict],
    judge: SceneJudge | None,
    config: DecodingConfig,
    weights: Sequence[float],
    names: Sequence[str],
    samples: int,
    retrieved: int,
    seed: int,
) -> list[dict]:
    items = [TaskInput(texts={"caption": d["caption"]}) for d in documents]
    rows = []
    for name in names:
        for weight in weights:
            plan = strategies(config, name, samples, weight)
            generations = model.run("text_to_image", items, plan, retrieved, seed)
            metrics, _ = image_metrics(model, documents, generations, judge, "objects", seed=seed)
            rows.append(_row(metrics, strategy=name, cfg_weight=weight, samples=samples))
    return rows


def samples_study(
    model: MultimodalModel,
    documents: Sequence[dict],
    judge: SceneJudge | None,
    config: DecodingConfig,
    counts: Sequence[int],
    retrieved: int,
    seed: int,
) -> list[dict]:
    items = [TaskInput(texts={"caption": d["caption"]}) for d in documents]
    plan = strategies(config, config.strategy, max(counts), config.cfg_weight)
    generations = model.run("text_to_image", items, plan, retrieved, seed)
    rows = []
    for n in sorted(counts):
        best = [rerank_prefix(g, n) for g in generations]
        metrics, _ = image_metrics(model, documents, generations, judge, "objects", best, seed=seed)
        rows.append(
            _row(metrics, samples=n, strategy=config.strategy, cfg_weight=config.cfg_weight)
        )
    return rows


def retrieval_study(
    model: MultimodalModel,
    documents: Sequence[dict],
    judge: SceneJudge | None,
    config: DecodingConfig,
    counts: Sequence[int],
    samples: int,
    seed: int,
) -> list[dict]:
    items = [TaskInput(texts={"caption": d["caption"]}) for d in documents]
    plan = strategies(config, config.strategy, samples, config.cfg_weight)
    rows = []
    for k in counts:
        generations = model.run("text_to_image", items, plan, k, seed)
        metrics, _ = image_metrics(model, documents, generations, judge, "objects", seed=seed)
        mean_docs = sum(len(g.retrieved) for g in generations) / max(len(generations), 1)
        rows.append(_row(metrics, retrieved=k, mean_retrieved=round(mean_docs, 3)))
    return rows
