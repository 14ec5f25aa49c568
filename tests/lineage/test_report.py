"""The HTML report: self-contained, with the metrics table; checked in a real headless browser."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from cm3leon.artifacts import write_png
from cm3leon.config import load_params
from cm3leon.lineage.report import ReportInputs, build_report, dag_svg, metrics_rows
from cm3leon.project import stage_arguments

from conftest import ROOT

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, root / name)
    evaluation = {
        model: {
            "text_to_image": {
                "accuracy": 0.25,
                "accuracy_1_objects": 0.5,
                "accuracy_2_objects": 0.0,
            },
            "captioning": {"attribute_exact_match": 0.125},
            "vqa": {"accuracy": 0.75},
            "editing": {"accuracy": 0.0625},
            "grounding": {"accuracy": 0.5},
            "segmentation": {"mean_iou": 0.375},
        }
        for model in ("pretrain", "sft")
    }
    eval_dir = root / "reports/eval"
    (eval_dir / "tables").mkdir(parents=True)
    (eval_dir / "metrics.json").write_text(json.dumps(evaluation))
    rows = [{"strategy": "top_p", "cfg_weight": 1.0, "accuracy": 0.3}]
    (eval_dir / "tables/cfg_weight.json").write_text(json.dumps(rows))
    write_png(eval_dir / "plots/cfg_weight.png", np.zeros((8, 8, 3), np.uint8))
    # an image_grid of 2 rows x 3 columns of 2x2-pixel images (cells of 2 + a 2-pixel gap)
    write_png(eval_dir / "samples/sft_text_to_image.png", np.full((10, 14, 3), 200, np.uint8))
    generations = eval_dir / "generations/sft/text_to_image"
    generations.mkdir(parents=True)
    shown = [
        {"file": f"{i:04d}.png", "prompt": f"prompt <{i}>", "correct": i == 0} for i in range(5)
    ]
    (generations / "manifest.json").write_text(json.dumps(shown))
    write_png(eval_dir / "samples/tasks.png", np.zeros((18, 10, 3), np.uint8))
    rows = [{"task": "editing", "row": r} for r in ("input", "target")]
    rows += [{"task": "editing", "row": f"{m} output"} for m in ("pretrain", "sft")]
    (eval_dir / "samples/tasks.json").write_text(json.dumps(rows))
    (root / "data/corpus").mkdir(parents=True)
    manifest = {"source": "shapeworld", "num_documents": 10, "splits": {"train": 8, "test": 2}}
    (root / "data/corpus/manifest.json").write_text(json.dumps(manifest))
    out = root / "reports/index.html"
    inputs = ReportInputs.from_arguments(stage_arguments(root, "report"))  # dvc.yaml's paths
    summary = build_report(root, inputs, load_params(root / "params.yaml"), out)
    return out, summary


def test_report_holds_the_metrics_and_needs_no_network(report):
    out, summary = report
    page = out.read_text()
    table = re.search(r'<table id="metrics">(.*?)</table>', page, re.S).group(1)
    assert table.count("<tr>") == 7  # header + six tasks
    number = '<td class="num">0.75</td>'
    assert f"<td>vqa</td><td>accuracy</td>{number}{number}" in table
    contents = re.search(r"<nav>(.*?)</nav>", page, re.S).group(1)
    for section in ("Model card", "Data card", "Pipeline", "Lineage of each model"):
        anchor = re.search(rf'<h2 id="([^"]+)">{section}</h2>', page).group(1)
        assert f'<a href="#{anchor}">{section}</a>' in contents  # the table of contents
    sources = re.findall(r'(?:src|href)="([^#"][^"]*)"', page)  # all but in-page anchors
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://', "")
    assert summary["metrics_rows"] == 6


def test_equal_artifacts_give_an_equal_page_wherever_the_project_lives(report, tmp_path):
    """The page is an output (``cm3leon verify`` compares its bytes): a clone in another
    folder renders the same page."""
    out, _ = report
    root = out.parents[1]
    elsewhere = tmp_path / "a-clone-elsewhere"
    shutil.copytree(root, elsewhere, ignore=shutil.ignore_patterns("index.html"))
    inputs = ReportInputs.from_arguments(stage_arguments(elsewhere, "report"))
    again = elsewhere / "reports/index.html"
    build_report(elsewhere, inputs, load_params(elsewhere / "params.yaml"), again)
    assert again.read_bytes() == out.read_bytes()


def test_sample_grids_are_labelled(report):
    """Each text-to-image grid says which row is the target and which the generation, and
    lists its columns' prompts (as many as the grid has columns, escaped) with correctness."""
    page = report[0].read_text()
    assert "Top row: the test image of each prompt (the target). Bottom row:" in page
    grid = re.search(r"Text to image, sft model</h3>.*?</figure>(.*?)</table>", page, re.S)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", grid.group(1))
    assert cells == [
        "1",
        "prompt &lt;0&gt;",
        "True",
        "2",
        "prompt &lt;1&gt;",
        "False",
        "3",
        "prompt &lt;2&gt;",
        "False",
    ]
    assert '<div class="scroll"><table' in page  # wide tables scroll in their box


def test_dag_svg_draws_every_stage_and_edge():
    svg = dag_svg(ROOT / "dvc.yaml", {"sft": "0123456789abcdef.dir"})
    for stage in ("prepare", "tokenize", "pretrain", "sft", "evaluate", "report"):
        assert f'<a href="#stage-{stage}">' in svg and f">{stage}</text>" in svg
    assert ">md5 01234567</text>" in svg  # the node's output hash
    assert svg.count("<line") >= 8


def test_task_grid_rows_are_named(report):
    """Evaluate's samples/tasks.json names each row of the task grid; the caption lists them."""
    page = report[0].read_text()
    caption = re.search(r"Image-output tasks</h3>.*?<ol>(.*?)</ol>", page, re.S).group(1)
    assert re.findall(r"<li>(.*?)</li>", caption) == [
        "editing: input",
        "editing: target",
        "editing: pretrain output",
        "editing: sft output",
    ]


@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    out, _ = report
    proc = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            out.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'id="metrics"' in dom and "<td>segmentation</td>" in dom  # the table rendered
    assert "cm3leon: model and data report" in dom
    problems = [
        line
        for line in proc.stderr.splitlines()
        if "Failed to load resource" in line or "net::ERR" in line or "Uncaught" in line
    ]
    assert problems == []


def test_a_task_the_corpus_has_no_rows_for_says_it_was_neither_trained_nor_scored():
    skipped = {t: f"no test rows in task table {t!r}" for t in ("vqa", "editing")}
    rows = metrics_rows({"judge": None, "skipped": skipped}, {"vqa": 0, "edits": 12})
    said = {r["task"]: r["metric"] for r in rows}
    assert said["vqa"] == "not trained or scored: the corpus has no 'vqa' rows (data.tasks)"
    assert said["editing"] == "not scored: no test rows in task table 'editing'"
