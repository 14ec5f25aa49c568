"""examples/export_sklearn_digits.py writes files the importers read whole (needs the
`examples` extra: scikit-learn ships the scans)."""

import runpy
from pathlib import Path

import pytest

from cm3leon.config import TaskFilesConfig
from cm3leon.data.importers import load_coco
from cm3leon.data.task_files import load_task_files

pytest.importorskip("sklearn")
SCRIPT = Path(__file__).resolve().parents[2] / "examples/export_sklearn_digits.py"


def test_digits_export_reads_as_coco_with_vqa_and_masks(tmp_path):
    export = runpy.run_path(str(SCRIPT))["export"]
    assert export(tmp_path) == 1797
    corpus = load_coco(tmp_path / "captions.json", tmp_path / "images", 32)
    assert len(corpus.records) == 1797 and not corpus.invalid
    config = TaskFilesConfig(
        vqa=str(tmp_path / "vqa.csv"), segmentation=str(tmp_path / "segmentation.csv")
    )
    tasks = load_task_files(config, corpus.records, 32)
    assert not tasks.invalid
    assert len(tasks.tables["vqa"]) == 2 * 1797 and len(tasks.tables["segmentation"]) == 1797
    first = tasks.tables["vqa"][0]
    assert first["question"] == "which digit is this?" and first["answers"] == ["zero", "0"]
