"""Lineage as a graph (cm3leon.lineage.lineage) on a hand-written dvc.lock: a diamond DAG."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cm3leon.lineage.lineage import (
    LineageError,
    format_diff,
    format_lineage,
    lineage_diff,
    to_dot,
    to_mermaid,
    trace,
)


def _stage(cmd, deps, outs, params=None):
    return {
        "cmd": cmd,
        "deps": [{"path": p, "md5": f"md5-{p}"} for p in deps],
        "outs": [{"path": p, "md5": f"md5-{p}"} for p in outs],
        **({"params": {"params.yaml": params}} if params else {}),
    }


def diamond(root: Path) -> Path:
    """prepare -> tokenize and index (both read the corpus) -> pretrain (reads both)."""
    lock = {
        "schema": "2.0",
        "stages": {
            "prepare": _stage(
                "p",
                ["stages/prepare.py", "data/raw"],
                ["data/corpus"],
                {"base.seed": 1234, "data": {"image_size": 32}},
            ),
            "tokenize": _stage("t", ["cm3leon/a.py", "data/corpus"], ["data/tokens", "models/vq"]),
            "index": _stage("i", ["data/corpus", "data/tokens"], ["data/retrieval"]),
            "pretrain": _stage(
                "x",
                ["cm3leon/b.py", "data/tokens", "data/retrieval"],
                ["models/pretrain"],
                {"base.seed": 7},
            ),
        },
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return root


def test_every_upstream_stage_appears_once(tmp_path: Path) -> None:
    record = trace(diamond(tmp_path), "models/pretrain/weights.safetensors")
    stages = record["stages"]
    assert list(stages) == ["pretrain", "tokenize", "index", "prepare"]  # nearest first
    assert record["artifact"] is not None and record["artifact"]["stage"] == "pretrain"
    inputs = {i["path"]: i["stage"] for i in stages["pretrain"]["inputs"]}
    assert inputs == {"data/tokens": "tokenize", "data/retrieval": "index"}
    assert [i["stage"] for i in stages["prepare"]["inputs"]] == [None]  # data/raw: source
    assert [c["path"] for c in stages["pretrain"]["code"]] == ["cm3leon/b.py"]
    # base.seed 7 differs from the default 1234; prepare's seed and image size do not
    assert stages["pretrain"]["params_changed"] == {"base.seed": 7}
    assert stages["prepare"]["params_changed"] == {}
    text = format_lineage(record)
    headers = [line for line in text.splitlines() if line.startswith("  stage '")]
    assert headers[0] == "  stage 'pretrain' -> models/pretrain [md5-models/pretrain]"
    assert [h.split("'")[1] for h in headers] == list(stages)
    assert "      base.seed = 7" in text and "data.image_size" not in text
    assert "      data.image_size = 32" in format_lineage(record, all_params=True)
    assert "    input data/raw [md5-data/raw] <- source data" in text
    # The report's form: what the artifacts are, not the moment of asking (git, Prefect runs).
    assert "  git commit " in text and "    prefect: " in text
    stable = format_lineage(record, run_context=False)
    assert "git commit" not in stable and "prefect: " not in stable
    assert [line for line in stable.splitlines() if line.startswith("  stage '")] == headers


def test_dot_and_mermaid_draw_each_edge_once(tmp_path: Path) -> None:
    record = trace(diamond(tmp_path), "models/pretrain")
    dot = to_dot(record)
    edges = [line.strip() for line in dot.splitlines() if "->" in line]
    assert sorted(edges) == sorted(
        [
            '"tokenize" -> "pretrain" [label="data/tokens"];',
            '"index" -> "pretrain" [label="data/retrieval"];',
            '"prepare" -> "tokenize" [label="data/corpus"];',
            '"prepare" -> "index" [label="data/corpus"];',
            '"tokenize" -> "index" [label="data/tokens"];',
        ]
    )
    mermaid = to_mermaid(record).splitlines()
    assert mermaid[0] == "flowchart LR" and "  prepare -->|data/corpus| index" in mermaid
    assert sum("-->" in line for line in mermaid) == 5


def test_diff_names_the_changed_param_and_the_stages_it_reran(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        ident = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
        subprocess.run(["git", *ident, *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    diamond(tmp_path)
    git("add", "-A")
    git("commit", "-qm", "a")
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    pretrain = lock["stages"]["pretrain"]
    pretrain["params"]["params.yaml"]["base.seed"] = 8
    pretrain["outs"][0]["md5"] = "md5-other"
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    git("commit", "-qam", "b")
    diff = lineage_diff(tmp_path, "HEAD~1", "HEAD")
    assert diff["params"] == {"base.seed": {"a": 7, "b": 8, "stages": ["pretrain"]}}
    assert diff["stages"] == {"pretrain": {"params": ["base.seed"], "outputs": ["models/pretrain"]}}
    assert lineage_diff(tmp_path, "HEAD")["stages"] == {}  # HEAD vs the workspace: no change
    text = format_diff(diff)
    assert "base.seed: 7 -> 8  (read by pretrain)" in text
    assert "stages whose run differs (1): pretrain" in text
    with pytest.raises(LineageError, match="neither a git revision nor a dvc experiment"):
        lineage_diff(tmp_path, "no-such-rev")


def test_a_metric_nan_on_both_sides_did_not_change():
    from cm3leon.lineage.lineage import changed_metrics

    nan = float("nan")
    diff = {
        "reports/sft/metrics.json": {
            "val_vqa/image_loss": {"old": nan, "new": nan, "diff": nan},
            "val/loss": {"old": 1.0, "new": nan, "diff": nan},
        },
        "reports/eval_metrics.json": {"x": {"old": nan, "new": nan}},
    }
    assert changed_metrics(diff) == {
        "reports/sft/metrics.json": {"val/loss": {"old": 1.0, "new": nan, "diff": nan}}
    }
