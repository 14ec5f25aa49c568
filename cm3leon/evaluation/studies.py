"""The paper's studies in miniature (CM3Leon Table 1, Fig. 4, Table 2; DESIGN.md §10).

Each study returns a table: a list of flat dicts (one row per setting), written as CSV and JSON
and plotted by :mod:`cm3leon.evaluation.evaluate`:

- :func:`cfg_study` — text-to-image accuracy vs CFG weight, for top-p, CD-K and their mix
  (every strategy draws the same number of samples per prompt, re-ranked, so the comparison is
  fair; ``mix`` alternates the two);
- :func:`samples_study` — accuracy vs samples per prompt with dual-encoder re-ranking: one run
  of ``max(samples)`` samples, re-ranked among its first ``n`` for each ``n``; with a judge
  also the share of samples that are right (``sample_accuracy``: the generator alone) and of
  prompts with a right sample among the first ``n`` (``oracle_accuracy``: a perfect
  re-ranker), so a row says whether the generator or the re-ranker loses the rest;
- :func:`retrieval_study` — accuracy vs retrieved documents at inference (0/1/2) for the
  retrieval-augmented pretrained model, at the CFG study's samples per prompt;
- the model comparisons (retrieval-augmented vs no-retrieval pretraining, pretrain vs SFT on
  every task) are assembled by the evaluator from the headline metrics.

Every study draws its images from a :class:`TextToImagePool`, which the headline shares: a
setting (strategy, CFG weight, retrieved documents) is generated once, with the most samples
any caller reserved for it, and each caller gets its first ``n`` samples.

Every row carries the generic metrics (R-precision and CLIPScore in the dual encoder's space)
and, when the corpus has a scene judge, the exact ones (``accuracy`` and its breakdown);
:func:`primary_metric` names the column a study is read by.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cm3leon.config import DecodingConfig
from cm3leon.data.scene_judge import SceneJudge
from cm3leon.evaluation.metrics import paired_difference_interval
from cm3leon.evaluation.tasks import image_metrics, sample_correctness, strategies
from cm3leon.inference.multimodal import Generation, MultimodalModel, TaskInput, first_samples


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


def with_headline(rows: Sequence[dict]) -> list[dict]:
    """Each row plus ``headline`` — the value of its :func:`primary_metric` — with that
    metric's 95% interval (``headline_low``/``headline_high``) and name (``headline_metric``):
    one field every corpus has, so ``dvc.yaml``'s plots read the same column on ShapeWorld
    (exact accuracy) and on a user's own data (R-precision)."""
    key = primary_metric(rows)
    return [
        {
            **r,
            "headline_metric": key,
            "headline": r[key],
            "headline_low": r.get(f"{key}_low"),
            "headline_high": r.get(f"{key}_high"),
        }
        for r in rows
    ]


class TextToImagePool:
    """Text-to-image generations of one model on the first documents of ``documents``, shared
    by the headline and the studies so that no setting is generated twice.

    A setting is ``(strategy plan, CFG weight, retrieved documents)``. :meth:`reserve` raises
    the samples per prompt its first draw makes; :meth:`get` returns ``samples`` samples per
    prompt for the first ``count`` documents, reusing a draw of that setting with at least as
    many samples on at least as many documents: its first ``samples`` samples, re-ranked among
    themselves (:func:`~cm3leon.inference.multimodal.first_samples`). That is a fair draw of the
    smaller plan: sample ``s`` of a plan has the same strategy whatever the plan's length
    (:func:`~cm3leon.decoding.selector.sample_plan` cycles) and the re-ranker scores each sample
    alone — only the random numbers differ from a run of that size by itself. Every draw uses
    the same ``seed``; draws of the same size share their random numbers (as the studies' rows
    did when each was a run of its own), but a row served from a larger draw — the CFG study's
    cell of the headline setting, the retrieval study's row of the headline's document count —
    uses other numbers than its neighbours: a fair draw, not a common-random-numbers pair. The
    headline of a model whose setting a study reserves more samples for is the first
    ``samples`` of that larger draw (the evaluate stage's SFT model: the samples study's 8).
    """

    def __init__(
        self,
        model: MultimodalModel,
        documents: Sequence[dict],
        config: DecodingConfig,
        seed: int,
    ) -> None:
        self.model, self.documents, self.config, self.seed = model, list(documents), config, seed
        self._reserved: dict[tuple, int] = {}
        self._drawn: dict[tuple, list[Generation]] = {}
        self.rows_generated = 0  # samples drawn so far (prompts x samples), for the log

    def reserve(self, strategy: str, cfg_weight: float, retrieved: int, samples: int) -> None:
        key = (strategy, float(cfg_weight), retrieved)
        self._reserved[key] = max(self._reserved.get(key, 0), samples)

    def get(
        self, strategy: str, cfg_weight: float, retrieved: int, samples: int, count: int
    ) -> list[Generation]:
        if not 1 <= count <= len(self.documents):
            raise ValueError(f"the pool holds {len(self.documents)} documents, asked for {count}")
        key = (strategy, float(cfg_weight), retrieved)
        drawn = self._drawn.get(key)
        if drawn is None or len(drawn) < count or len(drawn[0].samples) < samples:
            # A redraw covers at least what the previous draw did, so it never shrinks.
            n = max(samples, self._reserved.get(key, 0), len(drawn[0].samples) if drawn else 0)
            size = max(count, len(drawn) if drawn else 0)
            items = [TaskInput(texts={"caption": d["caption"]}) for d in self.documents[:size]]
            plan = strategies(self.config, strategy, n, cfg_weight)
            drawn = self.model.run("text_to_image", items, plan, retrieved, self.seed)
            self._drawn[key] = drawn
            self.rows_generated += size * n
        if len(drawn[0].samples) == samples:
            return drawn[:count]
        return [first_samples(g, samples) for g in drawn[:count]]


def cfg_study(
    pool: TextToImagePool,
    count: int,
    judge: SceneJudge | None,
    weights: Sequence[float],
    names: Sequence[str],
    samples: int,
    retrieved: int,
) -> list[dict]:
    """Accuracy per strategy and CFG weight; with a judge each row also carries
    ``gain_vs_cfg1`` (its accuracy minus the same strategy's at w = 1, on the same prompts) with
    the paired 95% interval (:func:`paired_columns`)."""
    documents = pool.documents[:count]
    rows, outcomes = [], {}
    for name in names:
        for weight in weights:
            generations = pool.get(name, weight, retrieved, samples, count)
            metrics, records = image_metrics(
                pool.model, documents, generations, judge, "objects", seed=pool.seed
            )
            rows.append(_row(metrics, strategy=name, cfg_weight=weight, samples=samples))
            outcomes[name, float(weight)] = records
    for row in rows:
        baseline = outcomes.get((row["strategy"], 1.0))
        if baseline is not None:
            own = outcomes[row["strategy"], float(row["cfg_weight"])]
            row.update(paired_columns(own, baseline, "gain_vs_cfg1"))
    return rows


def paired_columns(first: Sequence[dict], second: Sequence[dict], name: str) -> dict:
    """``name``, ``name_low``, ``name_high``: the share of ``first``'s records that are
    ``correct`` minus ``second``'s, record by record on the same examples, with Newcombe's paired
    95% interval (:func:`~cm3leon.evaluation.metrics.paired_difference_interval`); empty when
    the records carry no ``correct`` (no judge) or do not pair up."""
    if len(first) != len(second) or not first:
        return {}
    if not all("correct" in r for r in (*first, *second)):
        return {}
    difference, low, high = paired_difference_interval(
        [r["correct"] for r in first], [r["correct"] for r in second]
    )
    return {
        name: round(difference, 4),
        f"{name}_low": round(low, 4),
        f"{name}_high": round(high, 4),
    }


def samples_study(
    pool: TextToImagePool,
    count: int,
    judge: SceneJudge | None,
    counts: Sequence[int],
    retrieved: int,
) -> list[dict]:
    """One draw of ``max(counts)`` samples (reserved), re-ranked among its first ``n``."""
    config, documents = pool.config, pool.documents[:count]
    pool.reserve(config.strategy, config.cfg_weight, retrieved, max(counts))
    right = None
    if judge is not None:
        drawn = pool.get(config.strategy, config.cfg_weight, retrieved, max(counts), count)
        right, objects = sample_correctness(pool.model, documents, drawn, judge, "objects")
    rows = []
    for n in sorted(counts):
        generations = pool.get(config.strategy, config.cfg_weight, retrieved, n, count)
        metrics, _ = image_metrics(
            pool.model, documents, generations, judge, "objects", seed=pool.seed
        )
        row = _row(metrics, samples=n, strategy=config.strategy, cfg_weight=config.cfg_weight)
        if right is not None:
            row.update(generator_columns(right, objects, n))
        rows.append(row)
    return rows


def generator_columns(right: np.ndarray, objects: np.ndarray, samples: int) -> dict:
    """Of ``right`` (prompts, samples) — whether each sample is correct — and each prompt's
    object count: ``sample_accuracy`` (share of the first ``samples`` samples that are right)
    and ``oracle_accuracy`` (share of prompts with a right one among them), overall and by
    object count."""
    groups = [("", np.ones(len(objects), dtype=bool))]
    groups += [(f"_{c}_objects", objects == c) for c in sorted(set(objects.tolist()))]
    columns = {}
    for suffix, chosen in groups:
        first = right[chosen, :samples]
        columns[f"sample_accuracy{suffix}"] = round(float(first.mean()), 4)
        columns[f"oracle_accuracy{suffix}"] = round(float(first.any(1).mean()), 4)
    return columns


def retrieval_study(
    pool: TextToImagePool,
    count: int,
    judge: SceneJudge | None,
    counts: Sequence[int],
    samples: int,
) -> tuple[list[dict], list[dict]]:
    """The study's rows, and the per-prompt records (image, retrieved documents' ids, captions
    and scores, correctness) of its largest document count, for the generations folder."""
    config, documents = pool.config, pool.documents[:count]
    rows, kept = [], []
    for k in counts:
        generations = pool.get(config.strategy, config.cfg_weight, k, samples, count)
        metrics, records = image_metrics(
            pool.model, documents, generations, judge, "objects", seed=pool.seed
        )
        mean_docs = sum(len(g.retrieved) for g in generations) / max(len(generations), 1)
        rows.append(_row(metrics, retrieved=k, mean_retrieved=round(mean_docs, 3)))
        if k == max(counts):
            kept = records
    return rows, kept
