"""The pipeline's report: one self-contained HTML page with model and data cards (DESIGN.md §11).

:func:`build_report` reads the artifacts the stages left (metrics files, the corpus manifest,
the validation summary, the evaluation folder's tables, plots, grids and generation manifests,
the model folders' configs, ``dvc.yaml`` and ``dvc.lock``) and writes ``index.html`` with:

- the headline metrics table of every model and task (``<table id="metrics">``);
- a model card (intended use, training data, procedure, evaluation with the study tables and
  plots, limitations) and a data card (source, validation, splits, quarantined rows);
- the stage DAG, drawn as inline SVG from ``dvc.yaml``;
- the lineage of each model (:func:`cm3leon.lineage.lineage.trace`);
- sample grids and, for the first generations, the memory-bank documents they retrieved.

Everything is inline (CSS, SVG, images as ``data:`` URIs): the page opens without a network
or a server, and there is no JavaScript.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from cm3leon.artifacts import atomic_write_text
from cm3leon.config import Params
from cm3leon.lineage.lineage import format_lineage, trace
from cm3leon.tasks import TASKS, headline_metric


@dataclass(frozen=True)
class ReportInputs:
    """The artifacts the report reads, as the report stage's command in ``dvc.yaml`` names
    them (paths relative to the project root)."""

    corpus: Path
    validation: Path  # the validate stage's report folder
    evaluation: Path  # the evaluate stage's output folder
    models: Sequence[Path]  # exported model folders, traced in this order

    @classmethod
    def from_arguments(cls, options: Mapping[str, str]) -> ReportInputs:
        """From the report stage's options (``--corpus``, ``--validation``, ``--eval``,
        ``--models`` as a comma-separated list)."""
        return cls(
            Path(options["corpus"]),
            Path(options["validation"]),
            Path(options["eval"]),
            tuple(Path(m) for m in options["models"].split(",") if m),
        )


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.7em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:12px}
img{image-rendering:pixelated;max-width:100%}.note{color:#666}
.scroll{overflow-x:auto;max-width:100%}nav ol{columns:2}figcaption{color:#444;font-size:13px}
figure{margin:.8em 0}td.ok{color:#1a7f37}td.wrong{color:#b3261e}
"""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="note">({html.escape(alt)}: {html.escape(str(path))} not found)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: list[dict], table_id: str | None = None) -> str:
    if not rows:
        return '<p class="note">(no rows)</p>'
    columns = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    ident = f' id="{table_id}"' if table_id else ""
    return f'<div class="scroll"><table{ident}><tr>{head}</tr>{body}</table></div>'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def metrics_rows(evaluation: dict) -> list[dict]:
    """One row per task: the headline metric of each evaluated model (the exact one when the
    corpus has a scene judge, else the generic one: :func:`cm3leon.tasks.headline_metric`) and
    its 95% interval where the evaluation reports one; a task evaluate could not score says
    why; text-to-image is followed by the same metric on the real test images (the ceiling);
    then infilling (exact scene with a judge, else dual-encoder similarity) beside its spliced
    baseline."""
    models = [m for m in ("pretrain", "sft", "pretrain_no_retrieval") if m in evaluation]
    judged = evaluation.get("judge") is not None
    skipped = evaluation.get("skipped", {})
    rows = []
    for task, spec in TASKS.items():
        if task in skipped:
            rows.append({"task": task, "metric": f"not scored: {skipped[task]}"})
            continue
        key = headline_metric(spec, judged)
        row: dict[str, Any] = {"task": task, "metric": key}
        for model in models:
            metrics = evaluation[model].get(task, {})
            row[model] = metrics.get(key)
            interval = metrics.get(f"{key}_ci95")
            if interval is not None:
                row[f"{model} 95%"] = f"[{interval[0]:.2f}, {interval[1]:.2f}]"
        rows.append(row)
        real = evaluation.get("sft", {}).get(task, {}).get(f"real_{key}")
        if real is not None:  # the ceiling: the real test images of the same prompts
            rows.append({"task": f"{task}, real test images", "metric": key, "sft": real})
    infilling = evaluation.get("infilling", {})
    if infilling:  # the middle image rows regenerated; the spliced baseline ignores context
        key = "accuracy" if judged else "similarity_dual_encoder"
        row = {"task": "infilling", "metric": key}
        for model, metrics in infilling.items():
            row[model] = metrics.get(key)
            interval = metrics.get(f"{key}_ci95")
            if interval is not None:
                row[f"{model} 95%"] = f"[{interval[0]:.2f}, {interval[1]:.2f}]"
        rows.append(row)
        baseline = next(iter(infilling.values())).get(f"spliced_{key}")
        rows.append({"task": "infilling, spliced baseline", "metric": key, "sft": baseline})
    return rows


def dag_svg(dvc_yaml: Path) -> str:
    """The stage graph as an inline SVG: one column per DAG level, edges output -> consumer."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")).get("stages", {})
    producer = {}
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            producer[next(iter(out)) if isinstance(out, dict) else out] = name
    edges = set()
    for name, stage in stages.items():
        for dep in stage.get("deps", []):
            dep = dep if isinstance(dep, str) else next(iter(dep))
            for out, source in producer.items():
                if source != name and (dep == out or dep.startswith(out.rstrip("/") + "/")):
                    edges.add((source, name))
    level: dict[str, int] = {}
    for name in stages:  # dvc.yaml lists stages after the ones they need
        level[name] = 1 + max((level.get(a, 0) for a, b in edges if b == name), default=-1)
    columns: dict[int, list[str]] = {}
    for name, lv in level.items():
        columns.setdefault(lv, []).append(name)
    pos = {n: (20 + 150 * lv, 20 + 50 * i) for lv, ns in columns.items() for i, n in enumerate(ns)}
    width = 20 + 150 * (max(columns) + 1)
    height = 20 + 50 * max(len(ns) for ns in columns.values())
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">'
    ]
    for a, b in sorted(edges):
        (x1, y1), (x2, y2) = pos[a], pos[b]
        parts.append(
            f'<line x1="{x1 + 120}" y1="{y1 + 15}" x2="{x2}" y2="{y2 + 15}" stroke="#888"/>'
        )
    for name, (x, y) in pos.items():
        parts.append(
            f'<rect x="{x}" y="{y}" width="120" height="30" rx="4" fill="#eef" stroke="#669"/>'
            f'<text x="{x + 60}" y="{y + 19}" text-anchor="middle">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def build_report(
    project: str | Path,
    inputs: ReportInputs,
    params: Params,
    out_file: str | Path,
    samples: int = 4,
) -> dict[str, Any]:
    """Write the report; returns a summary (sections written, models traced)."""
    root = Path(project)
    eval_dir = root / inputs.evaluation
    evaluation = _read_json(eval_dir / "metrics.json") or {}
    corpus = _read_json(root / inputs.corpus / "manifest.json") or {}
    validation = _read_json(root / inputs.validation / "metrics.json") or {}
    summary_md = root / inputs.validation / "summary.md"
    sections = []

    sections.append(
        "<h2>Headline metrics (test split)</h2>" + _table(metrics_rows(evaluation), "metrics")
    )
    best = evaluation.get("best_text_to_image")
    if best:
        sections.append(
            "<p>Best text-to-image setting of the CFG study: "
            + html.escape(", ".join(f"{k} {_fmt(v)}" for k, v in best.items()))
            + "</p>"
        )

    model_card = [
        "<h2>Model card</h2>",
        "<h3>Intended use</h3><p>Research and teaching: a reproducible, small-scale replica of "
        "the CM3Leon recipe (retrieval-augmented CM3 pretraining, multi-task SFT, CFG / CD-K "
        "decoding) on procedurally generated ShapeWorld scenes or the user's own image-caption "
        "data. Not for production image generation; no safety filtering.</p>",
        "<h3>Training data</h3>"
        + _table(
            [
                {
                    "source": corpus.get("source"),
                    "documents": corpus.get("num_documents"),
                    "image size": corpus.get("image_size"),
                    **(corpus.get("splits") or {}),
                }
            ]
        ),
        "<h3>Procedure</h3>" + _procedure(root, inputs.models, params),
        "<h3>Evaluation</h3>" + _studies(eval_dir),
        "<h3>Limitations</h3>" + _limitations(evaluation),
    ]
    sections.append("".join(model_card))

    quarantine = corpus.get("quarantined", 0)
    source = getattr(params.data, str(corpus.get("source")), None)
    source_params = asdict(source) if source is not None else {}
    data_card = [
        "<h2>Data card</h2>",
        f"<p>Source: <b>{html.escape(str(corpus.get('source')))}</b> "
        f"({html.escape(json.dumps(source_params))})</p>",
        "<h3>Validation</h3>"
        + _table([{k: v for k, v in validation.items() if not isinstance(v, dict)}])
        + (
            f"<pre>{html.escape(summary_md.read_text(encoding='utf-8'))}</pre>"
            if summary_md.is_file()
            else ""
        ),
        "<h3>Splits</h3>" + _table([corpus.get("splits") or {}]),
        f"<h3>Quarantined rows</h3><p>{quarantine} rows set aside "
        f"(<code>{html.escape(str(inputs.corpus / 'quarantine.parquet'))}</code>, each with "
        "its file, row, document id and reason).</p>",
        "<h3>Task tables</h3>" + _table([corpus.get("tasks") or {}]),
    ]
    sections.append("".join(data_card))
    sections.append("<h2>Pipeline</h2>" + dag_svg(root / "dvc.yaml"))

    traced = []
    lineage_parts = ["<h2>Lineage of each model</h2>"]
    for model in map(str, inputs.models):
        if (root / model).exists():
            try:
                # Without the git state and Prefect runs of the moment it renders: the page
                # is an output, and equal artifacts must give equal bytes (cm3leon verify).
                text = format_lineage(trace(root, model), run_context=False)
            except ValueError as err:
                text = f"(no lineage: {err})"
            traced.append(model)
            lineage_parts.append(f"<h3>{model}</h3><pre>{html.escape(text)}</pre>")
    sections.append("".join(lineage_parts))
    sections.append(_samples(eval_dir, samples))

    body, contents = _with_anchors("".join(sections))
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>cm3leon report</title><style>{CSS}</style></head><body>"
        "<h1>cm3leon: model and data report</h1>"
        '<p class="note">Built from the artifacts and dvc.lock of the run (the git commit that '
        "holds them is the one this page is committed in).</p>"
        + contents
        + body
        + "</body></html>\n"
    )
    atomic_write_text(out_file, page)
    return {"models_traced": traced, "metrics_rows": len(metrics_rows(evaluation))}


def _with_anchors(body: str) -> tuple[str, str]:
    """Give every ``<h2>`` an id and return ``(body, table of contents)``."""
    contents, parts = [], body.split("<h2>")
    out = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        title = part.split("</h2>", 1)[0]
        contents.append(f'<li><a href="#section-{i}">{title}</a></li>')
        out.append(f'<h2 id="section-{i}">' + part)
    return "".join(out), "<nav><b>Contents</b><ol>" + "".join(contents) + "</ol></nav>"


def _procedure(root: Path, models: Sequence[Path], params: Params) -> str:
    rows = []
    for model in models:
        config = _read_json(root / model / "config.json")
        if config is None:
            continue
        train = params.sft.train if config.get("stage") == "sft" else params.pretrain.train
        shape = config.get("shape", {})
        rows.append(
            {
                "model": str(model),
                "layers": shape.get("n_layer"),
                "width": shape.get("d_model"),
                "context": shape.get("max_seq_len"),
                "steps": train.steps,
                "micro batch": train.micro_batch_size,
                "lr": train.lr,
                "retrieval k max": config.get("retrieval_k_max"),
            }
        )
    return _table(rows) + (
        "<p>Retrieval-augmented CM3 pretraining through DeepSpeed (fp32 on CPU, bf16 on GPU), "
        "then multi-task SFT from the pretrained weights; see params.yaml.</p>"
    )


def _studies(eval_dir: Path) -> str:
    parts = []
    for name in (
        "cfg_weight",
        "samples",
        "retrieved_docs",
        "ra_vs_no_retrieval",
        "pretrain_vs_sft",
    ):
        rows = _read_json(eval_dir / "tables" / f"{name}.json")
        if rows is None:
            continue
        parts.append(f"<h4>{name.replace('_', ' ')}</h4>" + _table(rows))
        parts.append(_img(eval_dir / "plots" / f"{name}.png", name))
    return "".join(parts) or '<p class="note">(no evaluation tables: run the evaluate stage)</p>'


def _limitations(evaluation: dict) -> str:
    items = [
        "Scores are exact only on ShapeWorld (its scene judge reads images and captions back); "
        "on other data the evaluate stage reports the generic metrics only (R-precision, "
        "CLIPScore and FID in the dual encoder's space beside the real test images' values; "
        "CIDEr-D and BLEU against every reference caption).",
        "FID, CLIPScore and R-precision are computed in the project's own dual encoder's "
        "feature space, not Inception's or CLIP's, unless local Inception weights are "
        "configured; image samples are re-ranked by the same encoder, so its scores of "
        "generated images are optimistic: compare them across models and with the real-image "
        "row, not with published numbers.",
    ]
    for task, why in evaluation.get("skipped", {}).items():
        items.append(f"Task {task} is not evaluated: {why}.")
    t2i = evaluation.get("sft", {}).get("text_to_image", {})
    if "accuracy_1_objects" in t2i:
        items.append(
            f"Text-to-image accuracy of the SFT model: {_fmt(t2i.get('accuracy_1_objects'))} on "
            f"one-object and {_fmt(t2i.get('accuracy_2_objects'))} on two-object prompts; "
            "two-object samples mostly draw two objects in the right cells but bind colors and "
            "shapes to the wrong one (README, Quality experiments)."
        )
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


# What each row of evaluate's task grid (samples/tasks.png) shows: per image-output task with a
# test table, the test row's image, then the pretrained and the SFT model's output.
TASK_GRID_INPUT = {
    "editing": "the image to edit (input)",
    "grounding": "the scene the boxes describe (target)",
    "segmentation": "the image to segment (input)",
}


def _samples(eval_dir: Path, count: int) -> str:
    parts = ["<h2>Samples and their retrieved documents</h2>"]
    for grid in sorted((eval_dir / "samples").glob("*_text_to_image.png")):
        model = grid.stem.removesuffix("_text_to_image")
        manifest = _read_json(eval_dir / "generations" / model / "text_to_image" / "manifest.json")
        shown = (manifest or [])[: _grid_columns(grid)]
        rows = [
            {"column": i + 1, "prompt": e["prompt"], "generated image correct": e.get("correct")}
            for i, e in enumerate(shown)
        ]
        parts.append(
            f"<h3>Text to image, {html.escape(model)} model</h3><figure>"
            + _img(grid, grid.stem)
            + "<figcaption>Top row: the test image of each prompt (the target). Bottom row: "
            "the model's generation for that prompt (best of the re-ranked samples). Columns, "
            "left to right, are the prompts below.</figcaption></figure>" + _table(rows)
        )
    tasks_grid = eval_dir / "samples" / "tasks.png"
    if tasks_grid.is_file():
        shown = [t for t in TASK_GRID_INPUT if t in TASKS]
        labels = "".join(
            f"<li>{html.escape(t)}: {html.escape(TASK_GRID_INPUT[t])}, then the pretrained "
            "model's output, then the SFT model's output</li>"
            for t in shown
        )
        parts.append(
            "<h3>Image-output tasks</h3><figure>"
            + _img(tasks_grid, "tasks")
            + "<figcaption>Three rows per task, top to bottom:<ol>"
            + labels
            + "</ol>Columns are test rows of that task.</figcaption></figure>"
        )
    manifest = _read_json(eval_dir / "generations" / "pretrain" / "text_to_image" / "manifest.json")
    rows = []
    parts.append("<h3>Pretrained model's generations with their retrieved documents</h3>")
    for entry in (manifest or [])[:count]:
        folder = eval_dir / "generations" / "pretrain" / "text_to_image"
        docs = "; ".join(
            f"{d['id']} ({d['score']:.3f}): {d['caption']}" for d in entry["retrieved"]
        )
        rows.append(
            {
                "image": entry["file"],
                "prompt": entry["prompt"],
                "correct": entry.get("correct"),
                "retrieved": docs or "none",
            }
        )
        parts.append(_img(folder / entry["file"], entry["prompt"]))
    parts.append(_table(rows))
    return "".join(parts)


def _grid_columns(grid: Path) -> int:
    """Columns of an evaluate-stage grid: cells of ``3 * image_size`` pixels plus 2-pixel
    borders (:func:`cm3leon.artifacts.image_grid` at scale 3), read from the PNG's width."""
    with Image.open(grid) as image:
        width, height = image.size
    cell = (height - 2) // 2  # two rows
    return max(1, (width - 2) // cell)
