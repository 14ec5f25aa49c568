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
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from cm3leon.artifacts import atomic_write_text
from cm3leon.config import Params
from cm3leon.lineage.lineage import format_stage, trace
from cm3leon.tasks import TASKS, headline_metric


@dataclass(frozen=True)
class ReportInputs:
    """The artifacts the report reads, as the report stage's command in ``dvc.yaml`` names
    them (paths relative to the project root)."""

    corpus: Path
    validation: Path  # the validate stage's report folder
    evaluation: Path  # the evaluate stage's output folder
    models: Sequence[Path]  # exported model folders, traced in this order
    # each model's training summary (dvclive's last step: ``step``, ``train/tokens_seen``),
    # in the order of ``models``; empty: the procedure table falls back to the params
    training: Sequence[Path] = ()

    @classmethod
    def from_arguments(cls, options: Mapping[str, str]) -> ReportInputs:
        """From the report stage's options (``--corpus``, ``--validation``, ``--eval``,
        ``--models`` and ``--training`` as comma-separated lists)."""
        return cls(
            Path(options["corpus"]),
            Path(options["validation"]),
            Path(options["eval"]),
            tuple(Path(m) for m in options["models"].split(",") if m),
            tuple(Path(t) for t in options.get("training", "").split(",") if t),
        )


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.7em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left}th{background:#f3f3f3}td.num{text-align:right}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:12px}
img{image-rendering:pixelated;max-width:100%}.note{color:#666}
.scroll{overflow-x:auto;max-width:100%}nav ol{columns:2}figcaption{color:#444;font-size:13px}
figure{margin:.8em 0}td.ok{color:#1a7f37}td.wrong{color:#b3261e}
img.thumb{width:64px;height:64px;vertical-align:middle;margin-right:4px}
.doc{display:inline-block;vertical-align:top;margin:0 10px 4px 0;font-size:12px;width:190px}
.stage{border-left:3px solid #669;padding-left:.6em;margin:1em 0}svg a:hover rect{fill:#dde}
"""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _img(path: Path, alt: str, css: str | None = None) -> str:
    if not path.is_file():
        return f'<p class="note">({html.escape(alt)}: {html.escape(str(path))} not found)</p>'
    return _img_bytes(path.read_bytes(), alt, css)


def _img_bytes(png: bytes, alt: str, css: str | None = None) -> str:
    data = base64.b64encode(png).decode()
    klass = f' class="{css}"' if css else ""
    return f'<img{klass} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: list[dict], table_id: str | None = None) -> str:
    if not rows:
        return '<p class="note">(no rows)</p>'
    columns = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f'<div class="scroll"><table{ident}><tr>{head}</tr>{body}</table></div>'


def _cell(value: Any) -> str:
    """A table cell; numbers right-aligned (``td.num``), text left."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    opening = '<td class="num">' if number else "<td>"
    return f"{opening}{html.escape(_fmt(value))}</td>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def metrics_rows(evaluation: dict, corpus_tasks: Mapping[str, int] | None = None) -> list[dict]:
    """One row per task: the headline metric of each evaluated model (the exact one when the
    corpus has a scene judge, else the generic one: :func:`cm3leon.tasks.headline_metric`) and
    its 95% interval where the evaluation reports one; a task evaluate could not score says
    why; text-to-image is followed by the same metric on the real test images (the ceiling);
    editing and grounding without a judge by their non-answer baselines; then infilling (exact
    scene with a judge, else dual-encoder similarity) beside its spliced baseline.
    ``corpus_tasks``: rows per task table of the corpus (its manifest): a table task without
    any was neither trained by SFT nor scored, and its row says so."""
    models = [m for m in ("pretrain", "sft", "pretrain_no_retrieval") if m in evaluation]
    judged = evaluation.get("judge") is not None
    skipped = evaluation.get("skipped", {})
    rows = []
    for task, spec in TASKS.items():
        if task in skipped:
            if spec.table is not None and (corpus_tasks or {}).get(spec.table) == 0:
                why = f"not trained or scored: the corpus has no {spec.table!r} rows (data.tasks)"
            else:
                why = f"not scored: {skipped[task]}"
            rows.append({"task": task, "metric": why})
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
        baseline = evaluation.get("sft", {}).get(task, {}).get(f"baseline_{key}")
        if baseline is not None:  # a non-answer to beat (cm3leon.evaluation.tasks.target_metrics)
            what = "input image unchanged" if spec.input_images else "another test row's image"
            rows.append({"task": f"{task}, baseline: {what}", "metric": key, "sft": baseline})
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


def dag_svg(dvc_yaml: Path, hashes: Mapping[str, str] | None = None) -> str:
    """The stage graph as an inline SVG: one column per DAG level, edges output -> consumer.
    Each node is a link to ``#stage-<name>`` (the stage's details on the page) and shows the
    first 8 hex digits of its first output's hash from ``hashes`` (``{stage: md5}``)."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")).get("stages", {})
    hashes = hashes or {}
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
    pos = {n: (10 + 150 * lv, 10 + 56 * i) for lv, ns in columns.items() for i, n in enumerate(ns)}
    width = 10 + 150 * (max(columns) + 1)
    height = 10 + 56 * max(len(ns) for ns in columns.values())
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12" role="img" aria-label="stage graph">'
    ]
    for a, b in sorted(edges):
        (x1, y1), (x2, y2) = pos[a], pos[b]
        parts.append(
            f'<line x1="{x1 + 128}" y1="{y1 + 20}" x2="{x2}" y2="{y2 + 20}" stroke="#888"/>'
        )
    for name, (x, y) in pos.items():
        digest = hashes.get(name)
        label = f"md5 {digest[:8]}" if digest else "details"
        parts.append(
            f'<a href="#stage-{html.escape(name)}"><title>stage {html.escape(name)}: '
            f"{html.escape(str(digest or 'no hash recorded'))}</title>"
            f'<rect x="{x}" y="{y}" width="128" height="40" rx="4" fill="#eef" stroke="#669"/>'
            f'<text x="{x + 64}" y="{y + 17}" text-anchor="middle">{html.escape(name)}</text>'
            f'<text x="{x + 64}" y="{y + 32}" text-anchor="middle" font-size="10" '
            f'fill="#555">{html.escape(label)}</text></a>'
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

    headline = metrics_rows(evaluation, corpus.get("tasks"))
    sections.append("<h2>Headline metrics (test split)</h2>" + _table(headline, "metrics"))
    best = evaluation.get("best_text_to_image")
    if best:
        key = best.get("metric", "accuracy")
        sections.append(
            "<p>Best text-to-image setting of the CFG study (every column: the study's "
            "table below):</p>"
            + _table(
                [
                    {
                        "strategy": best.get("strategy"),
                        "CFG weight": best.get("cfg_weight"),
                        "samples": best.get("samples"),
                        key: best.get(key),
                        "95%": f"[{_fmt(best.get(f'{key}_low'))}, {_fmt(best.get(f'{key}_high'))}]",
                        f"{key}, same strategy without CFG": best.get("no_cfg_same_strategy"),
                        "prompts": best.get("examples"),
                    }
                ]
            )
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
        "<h3>Procedure</h3>" + _procedure(root, inputs, params),
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
    traced, pipeline, lineage = _lineage(root, inputs)
    sections.append(pipeline)
    sections.append(lineage)
    sections.append(_samples(root, eval_dir, inputs.corpus, samples))

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


def _lineage(root: Path, inputs: ReportInputs) -> tuple[list[str], str, str]:
    """``(models traced, the Pipeline section, the Lineage section)``: the DAG with each
    node's output hash and a link to that stage's record, which the Lineage section holds once
    per stage — the models' and the evaluation's lineage merged (:func:`trace`) — after one
    line per model naming the stages it descends from. Without the git state and Prefect runs
    of the moment: the page is an output, and equal artifacts give equal bytes."""
    traced, stages, chains, packages, errors = [], {}, {}, None, []
    if not (root / "dvc.lock").is_file():
        errors.append("no dvc.lock: run the pipeline (dvc repro) for the lineage")
    for target in [*map(str, inputs.models), str(inputs.evaluation)]:
        if not (root / target).exists() or errors:
            continue
        try:
            record = trace(root, target)
        except ValueError as err:
            errors.append(f"{target}: no lineage ({err})")
            continue
        packages = record["packages"]
        for name, node in record["stages"].items():
            merged = stages.setdefault(name, {**node, "outputs": []})
            for output in node["outputs"]:
                if output not in merged["outputs"]:
                    merged["outputs"].append(output)
        if target != str(inputs.evaluation):
            traced.append(target)
            chains[target] = list(record["stages"])
    order = list(yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    stages = dict(sorted(stages.items(), key=lambda item: order.index(item[0])))
    chains = {m: sorted(c, key=order.index, reverse=True) for m, c in chains.items()}
    hashes = {name: node["output_md5"] for name, node in stages.items()}
    pipeline = (
        '<h2>Pipeline</h2><figure><div class="scroll">'
        + dag_svg(root / "dvc.yaml", hashes)
        + "</div><figcaption>The DVC stages, left to right in dependency order; each node shows "
        "its output's hash and links to its record below.</figcaption></figure>"
    )
    parts = ["<h2>Lineage of each model</h2>"]
    for model, chain in chains.items():
        links = " &larr; ".join(f'<a href="#stage-{n}">{html.escape(n)}</a>' for n in chain)
        parts.append(f"<p><b>{html.escape(model)}</b>: {links}</p>")
    parts.extend(f'<p class="note">{html.escape(e)}</p>' for e in errors)
    if packages:
        parts.append(
            "<p>Packages: "
            + html.escape(", ".join(f"{k} {v}" for k, v in packages.items()))
            + "</p>"
        )
    for name, node in stages.items():
        parts.append(
            f'<div class="stage" id="stage-{html.escape(name)}"><h3>stage {html.escape(name)}'
            f"</h3><pre>{html.escape(format_stage(node, run_context=False))}</pre></div>"
        )
    parts.append(
        '<div class="stage" id="stage-report"><h3>stage report</h3><p>This page, built from '
        "the artifacts above; its own hash is in dvc.lock.</p></div>"
    )
    return traced, pipeline, "".join(parts)


def _with_anchors(body: str) -> tuple[str, str]:
    """Give every ``<h2>`` an id and return ``(body, table of contents)``."""
    contents, parts = [], body.split("<h2>")
    out = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        title = part.split("</h2>", 1)[0]
        contents.append(f'<li><a href="#section-{i}">{title}</a></li>')
        out.append(f'<h2 id="section-{i}">' + part)
    return "".join(out), "<nav><b>Contents</b><ol>" + "".join(contents) + "</ol></nav>"


def _procedure(root: Path, inputs: ReportInputs, params: Params) -> str:
    """Per model its shape and what its run did: optimizer steps and tokens seen from its
    training summary (``inputs.training``: a time budget or early stop can end a run before
    the params' steps), else the params' steps, marked as such."""
    rows = []
    summaries = dict(zip(inputs.models, inputs.training, strict=False))
    artifacts = _declared_models(root)
    for model in inputs.models:
        config = _read_json(root / model / "config.json")
        if config is None:
            continue
        train = params.sft.train if config.get("stage") == "sft" else params.pretrain.train
        shape = config.get("shape", {})
        summary = _read_json(root / summaries[model]) if model in summaries else None
        steps = (summary or {}).get("step")
        rows.append(
            {
                "model": str(model),
                "registry artifact": artifacts.get(str(model)),
                "layers": shape.get("n_layer"),
                "width": shape.get("d_model"),
                "heads": shape.get("n_head"),
                "context": shape.get("max_seq_len"),
                "steps run": steps if steps is not None else f"{train.steps} (params)",
                "tokens seen": ((summary or {}).get("train") or {}).get("tokens_seen"),
                "micro batch": train.micro_batch_size,
                "lr": train.lr,
                "retrieval k max": config.get("retrieval_k_max"),
            }
        )
    return _table(rows) + (
        "<p>Retrieval-augmented CM3 pretraining through DeepSpeed (fp32 on CPU, bf16 on GPU), "
        "then multi-task SFT from the pretrained weights; steps and tokens are the run's "
        "(its training summary), the rest params.yaml's. The registry artifact is the model's "
        "name under <code>artifacts:</code> in dvc.yaml; its versions and stages are git tags "
        "made after this page (<code>gto show</code>, <code>cm3leon lineage</code>).</p>"
    )


def _declared_models(root: Path) -> dict[str, str]:
    """``{model path: artifact name}`` of the models ``dvc.yaml`` declares (none: empty)."""
    from cm3leon.lineage.registry import RegistryError, declared_artifacts

    try:
        return {d.path: d.name for d in declared_artifacts(root)}
    except RegistryError:
        return {}


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
        "configured; image samples are re-ranked by the same encoder (with the SFT model's "
        "caption likelihood added), so its scores of "
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


def _samples(root: Path, eval_dir: Path, corpus: Path, count: int) -> str:
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
    parts.append(_tasks_grid(eval_dir))
    parts.append(_retrieved(root, eval_dir, corpus, count))
    return "".join(parts)


def _tasks_grid(eval_dir: Path) -> str:
    """``samples/tasks.png`` with its rows named by ``samples/tasks.json`` (evaluate writes
    both: per image-output task its input image if it reads one, the target, then the
    pretrained and the SFT model's output)."""
    grid, labels = eval_dir / "samples" / "tasks.png", _read_json(eval_dir / "samples/tasks.json")
    if not grid.is_file():
        return ""
    rows = "".join(
        f"<li>{html.escape(r['task'])}: {html.escape(r['row'])}</li>" for r in labels or []
    )
    return (
        "<h3>Image-output tasks</h3><figure>"
        + _img(grid, "tasks")
        + "<figcaption>Rows, top to bottom:<ol>"
        + (rows or "<li>(samples/tasks.json not found: rows unnamed)</li>")
        + "</ol>Columns are test rows of each task (the same row down a task's "
        "rows).</figcaption></figure>"
    )


def _retrieved(root: Path, eval_dir: Path, corpus: Path, count: int) -> str:
    """The first ``count`` generations of the retrieval study at its most documents (the
    headline's own when it retrieves), each beside thumbnails of the memory-bank documents
    its prompt retrieved — the images the model saw in its context — with ids and scores."""
    folder = eval_dir / "generations" / "pretrain" / "retrieved_docs"
    if not (folder / "manifest.json").is_file():
        folder = eval_dir / "generations" / "pretrain" / "text_to_image"
    manifest = (_read_json(folder / "manifest.json") or [])[:count]
    if not manifest:
        return ""
    ids = {d["id"] for e in manifest for d in e["retrieved"]}
    thumbs = _corpus_thumbnails(root / corpus, ids)
    rows = []
    for entry in manifest:
        docs = "".join(
            '<span class="doc">'
            + thumbs.get(d["id"], "(image not in the corpus)")
            + f"<br>{html.escape(d['id'])} score {d['score']:.3f}<br>"
            + html.escape(d["caption"])
            + "</span>"
            for d in entry["retrieved"]
        )
        rows.append(
            "<tr><td>"
            + _img(folder / entry["file"], entry["prompt"], "thumb")
            + f"</td><td>{html.escape(entry['prompt'])}</td>"
            + f'<td class="{"ok" if entry.get("correct") else "wrong"}">'
            + f"{html.escape(_fmt(entry.get('correct')))}</td>"
            + f"<td>{docs or 'none'}</td></tr>"
        )
    k = manifest[0].get("retrieved_k", 0)
    return (
        f"<h3>Pretrained model's generations with the {k} documents each prompt retrieved</h3>"
        f'<p class="note">From <code>{html.escape(str(folder.relative_to(root)))}</code>: the '
        "generated image, its prompt, whether the judge found it right, and the memory-bank "
        "documents prepended to the prompt (image, id, retrieval score, caption).</p>"
        '<div class="scroll"><table><tr><th>generated</th><th>prompt</th><th>correct</th>'
        "<th>retrieved documents</th></tr>" + "".join(rows) + "</table></div>"
    )


def _corpus_thumbnails(corpus_dir: Path, ids: set[str]) -> dict[str, str]:
    """``{id: <img>}`` of the corpus documents ``ids`` (as PNGs, ``thumb`` sized)."""
    from cm3leon.data.corpus import CorpusError, decode_images, iter_documents

    found = {}
    try:
        for batch in iter_documents(corpus_dir, ["id", "image", "height", "width"]):
            keep = [i for i, d in enumerate(batch.column("id").to_pylist()) if d in ids]
            if keep:
                chosen = batch.take(keep)
                names = chosen.column("id").to_pylist()
                for doc, image in zip(names, decode_images(chosen), strict=True):
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG")
                    found[doc] = _img_bytes(buffer.getvalue(), doc, "thumb")
    except (CorpusError, FileNotFoundError):
        return found
    return found


def _grid_columns(grid: Path) -> int:
    """Columns of an evaluate-stage grid: cells of ``3 * image_size`` pixels plus 2-pixel
    borders (:func:`cm3leon.artifacts.image_grid` at scale 3), read from the PNG's width."""
    with Image.open(grid) as image:
        width, height = image.size
    cell = (height - 2) // 2  # two rows
    return max(1, (width - 2) // cell)
