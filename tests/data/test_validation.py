"""Tests for the great_expectations corpus gate (cm3leon.data.validation)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cm3leon.config import DataConfig, ValidateConfig
from cm3leon.data.corpus import CorpusError, CorpusRecord, write_corpus
from cm3leon.data.validation import (
    ValidationReport,
    check_validated,
    split_frame,
    validate_corpus,
)

SIZE = 32
DATA_CONFIG = DataConfig(image_size=SIZE)
CONFIG = ValidateConfig(split_tolerance=0.02, sample_failures=5)


def make_records(n: int = 40, splits: tuple[int, int, int] = (32, 4, 4)) -> list[CorpusRecord]:
    rng = np.random.default_rng(0)
    names = ["train"] * splits[0] + ["val"] * splits[1] + ["test"] * splits[2]
    assert len(names) == n
    return [
        CorpusRecord(
            id=f"doc-{i:03d}",
            split=split,
            caption=f"a picture number {i}",
            captions=(f"a picture number {i}",),
            image=rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8),
            source="shapeworld",
        )
        for i, split in enumerate(names)
    ]


def vqa_rows(records: list[CorpusRecord]) -> list[dict[str, str]]:
    return [
        {"image_id": r.id, "question": "what?", "answer": "a square", "question_type": "shape"}
        for r in records[:5]
    ]


def build(
    tmp_path: Path,
    records: list[CorpusRecord],
    vqa: list[dict[str, str]] | None = None,
    quarantine: list[dict[str, str]] = (),
) -> Path:
    corpus = tmp_path / "corpus"
    tasks = {"vqa": vqa if vqa is not None else vqa_rows(records)}
    write_corpus(
        corpus,
        records,
        source="shapeworld",
        image_size=SIZE,
        shard_size=16,
        tasks=tasks,
        quarantine=quarantine,
    )
    return corpus


def run(tmp_path: Path, corpus: Path) -> ValidationReport:
    return validate_corpus(corpus, DATA_CONFIG, CONFIG, tmp_path / "report")


def failed(report: ValidationReport) -> set[tuple[str, str, str | None]]:
    return {(f.suite, f.expectation, f.column) for f in report.failures}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ValidationReport]:
    tmp_path = tmp_path_factory.mktemp("clean")
    return tmp_path, run(tmp_path, build(tmp_path, make_records()))


def test_clean_corpus_passes(clean: tuple[Path, ValidationReport]) -> None:
    tmp_path, report = clean
    assert report.success, report.format_failures()
    assert report.failures == []
    out = tmp_path / "report"
    for name in ("results.json", "metrics.json", "summary.md", "data_docs/index.html"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["success"] is True
    assert metrics["documents"] == 40
    assert (metrics["documents_train"], metrics["documents_val"], metrics["documents_test"]) == (
        32,
        4,
        4,
    )
    assert metrics["task_vqa_rows"] == 5 and metrics["task_edits_rows"] == 0
    assert metrics["expectations_failed"] == 0 and metrics["success_percent"] == 100.0
    results = json.loads((out / "results.json").read_text())
    assert {"documents", "split_leakage", "split_proportions", "task_vqa"} <= set(results)
    assert "PASSED" in (out / "summary.md").read_text()
    assert not (Path.cwd() / "gx").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_equal_data_gives_equal_report_bytes(clean: tuple[Path, ValidationReport]) -> None:
    """Data Docs are a DVC output: a second run on the same corpus writes the same bytes
    (GE's run ids, clock stamps and random element ids are fixed or normalized), and the
    renumbered element ids still pair each collapsible block's link with its body."""
    tmp_path, _ = clean
    again = validate_corpus(tmp_path / "corpus", DATA_CONFIG, CONFIG, tmp_path / "again")
    assert again.success
    first, second = tmp_path / "report", tmp_path / "again"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert any(f.parts[0] == "data_docs" and f.parts[1] == "validations" for f in files)
    differing = [f for f in files if (first / f).read_bytes() != (second / f).read_bytes()]
    assert differing == []
    for page in (first / "data_docs" / "validations").rglob("*.html"):
        text = page.read_text()
        links = set(re.findall(r'href="#(section-[^"]+-collapse-body-[^"]+)"', text))
        assert links, page
        assert all(f"id={link} " in text or f'id="{link}"' in text for link in links), page
        assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-", text), page  # no uuid4


def test_the_gate_names_the_corpus_it_passed(
    clean: tuple[Path, ValidationReport], tmp_path: Path
) -> None:
    """check_validated accepts the validated corpus and refuses the same folder once a byte of
    it changed, or a failed, missing or torn metrics file, each with the file named."""
    root, _ = clean
    metrics = root / "report" / "metrics.json"
    check_validated(root / "corpus", metrics)
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "corpus", corpus)
    check_validated(corpus, metrics)  # same bytes elsewhere: the same corpus
    shard = sorted(corpus.glob("shard-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(CorpusError, match=r"is not the corpus .* validated .* changed after"):
        check_validated(corpus, metrics)
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps({**json.loads(metrics.read_text()), "success": False}))
    with pytest.raises(CorpusError, match=r"failed.json says the corpus failed validation"):
        check_validated(root / "corpus", failed)
    with pytest.raises(CorpusError, match=r"missing.json not found"):
        check_validated(root / "corpus", tmp_path / "missing.json")
    torn = tmp_path / "torn.json"
    torn.write_text('{"success": tr')
    with pytest.raises(CorpusError, match=r"torn.json is not valid JSON"):
        check_validated(root / "corpus", torn)


def test_quarantined_rows_are_counted_and_named_in_the_summary(tmp_path: Path) -> None:
    bad = [
        {"file": "m.csv", "row": "3", "path": "x.png", "reason": "image file not found"},
        {"file": "m.csv", "row": "7", "path": "y.png", "reason": "caption is empty"},
    ]
    report = run(tmp_path, build(tmp_path, make_records(), quarantine=bad))
    assert report.success and report.metrics["quarantined_rows"] == 2
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "2 invalid input rows were set aside" in summary and "quarantine.parquet" in summary


def test_empty_caption(tmp_path: Path) -> None:
    records = make_records()
    records[3] = replace(records[3], caption="")
    report = run(tmp_path, build(tmp_path, records))
    assert not report.success
    assert ("documents", "expect_column_value_lengths_to_be_between", "caption") in failed(report)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "FAILED" in summary and "caption" in summary


def test_duplicate_id(tmp_path: Path) -> None:
    records = make_records()
    records[1] = replace(records[1], id=records[0].id)
    report = run(tmp_path, build(tmp_path, records))
    assert ("documents", "expect_column_values_to_be_unique", "id") in failed(report)
    assert "doc-000" in report.format_failures()


def test_offending_values_are_escaped_in_the_data_docs(tmp_path: Path) -> None:
    """A value from the data is text in the Data Docs, never markup (a caption or id may hold
    anything the user's data holds)."""
    attack = '<img src=x onerror="alert(1)">'
    records = make_records()
    records[1] = replace(records[1], id=attack)
    records[2] = replace(records[2], id=attack)  # a duplicate id: shown as an offending value
    report = run(tmp_path, build(tmp_path, records))
    assert ("documents", "expect_column_values_to_be_unique", "id") in failed(report)
    assert attack in report.format_failures()  # the summary (Markdown) keeps the raw value
    pages = "".join(
        p.read_text(encoding="utf-8") for p in (tmp_path / "report" / "data_docs").rglob("*.html")
    )
    assert "&lt;img src=x onerror=" in pages
    assert "<img src=x" not in pages


def test_same_image_in_two_splits(tmp_path: Path) -> None:
    records = make_records()
    records[35] = replace(records[35], image=records[0].image.copy())  # val gets a train image
    report = run(tmp_path, build(tmp_path, records))
    assert failed(report) == {
        ("split_leakage", "expect_column_values_to_be_unique", "image_sha256")
    }


def test_task_row_with_missing_image(tmp_path: Path) -> None:
    records = make_records()
    vqa = vqa_rows(records)
    vqa[0] = {**vqa[0], "image_id": "no-such-doc"}
    report = run(tmp_path, build(tmp_path, records, vqa))
    assert failed(report) == {
        ("task_vqa", "expect_column_pair_values_to_be_equal", "image_id,document_id")
    }
    assert "no-such-doc" in report.format_failures()


def test_wrong_image_size(tmp_path: Path) -> None:
    records = make_records()
    small = np.zeros((16, 16, 3), dtype=np.uint8)
    records[5] = replace(records[5], image=small)
    report = run(tmp_path, build(tmp_path, records))
    assert ("documents", "expect_column_values_to_be_in_set", "height") in failed(report)
    assert ("documents", "expect_column_values_to_be_in_set", "width") in failed(report)


def test_stored_hash_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = build(tmp_path, make_records())
    shard = corpus / "shard-00000.parquet"
    table = pq.read_table(shard)
    hashes = table.column("image_sha256").to_pylist()
    hashes[2] = "0" * 64
    index = table.schema.get_field_index("image_sha256")
    table = table.set_column(index, "image_sha256", pa.array(hashes, pa.string()))
    pq.write_table(table, shard)
    monkeypatch.chdir(tmp_path)  # a relative report folder works, and GE leaves no gx/ behind
    report = validate_corpus(corpus, DATA_CONFIG, CONFIG, Path("report"))
    assert (tmp_path / "report" / "data_docs" / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "report"]
    expected = (
        "documents",
        "expect_column_pair_values_to_be_equal",
        "image_sha256,sha256_recomputed",
    )
    assert failed(report) == {expected}
    assert report.metrics["expectations_failed"] == 1


def test_split_proportions_allow_one_image_of_rounding() -> None:
    """9 images at 0.8/0.1/0.1 can only be cut 7/1/1 (train 0.022 off, over a 0.02 tolerance):
    that is rounding, not a bad split; 5/2/2 of the same 9 is not."""
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}

    def frame(counts: tuple[int, int, int]) -> pd.DataFrame:
        names = ("train", "val", "test")
        splits = [s for s, n in zip(names, counts, strict=True) for _ in range(n)]
        docs = pd.DataFrame({"split": splits, "image_sha256": [f"h{i}" for i in range(9)]})
        return split_frame(docs, fractions)

    rounded = frame((7, 1, 1))
    assert rounded["deviation"].max() > CONFIG.split_tolerance
    assert rounded["excess_deviation"].max() == 0.0
    skewed = frame((5, 2, 2))
    assert skewed["excess_deviation"].max() > CONFIG.split_tolerance  # train 0.24 off


def test_split_proportions_off(tmp_path: Path) -> None:
    report = run(tmp_path, build(tmp_path, make_records(splits=(36, 2, 2))))
    assert failed(report) == {
        ("split_proportions", "expect_column_values_to_be_between", "excess_deviation")
    }
    unchecked = ValidateConfig(check_split_proportions=False)
    report = validate_corpus(tmp_path / "corpus", DATA_CONFIG, unchecked, tmp_path / "report2")
    assert report.success, report.format_failures()
