"""Tests for reading the corpus folder (cm3leon.data.corpus): damaged files are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cm3leon.data.corpus import (
    CorpusError,
    CorpusRecord,
    read_documents,
    read_manifest,
    read_quarantine,
    read_task_table,
    write_corpus,
)

SIZE = 8


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    records = [
        CorpusRecord(
            id=f"doc-{i:03d}",
            split="train",
            caption=f"picture {i}",
            captions=(f"picture {i}",),
            image=rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8),
            source="shapeworld",
        )
        for i in range(40)
    ]
    write_corpus(tmp_path / "corpus", records, source="shapeworld", image_size=SIZE, shard_size=20)
    return tmp_path / "corpus"


def test_an_intact_corpus_reads(corpus: Path) -> None:
    assert read_documents(corpus, ["id"]).num_rows == 40
    assert read_quarantine(corpus).num_rows == 0
    assert read_task_table(corpus, "vqa").num_rows == 0


@pytest.mark.parametrize("damage", ["flipped", "truncated", "empty"])
def test_a_damaged_shard_is_named(corpus: Path, damage: str) -> None:
    shard = corpus / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    if damage == "flipped":  # the middle of the data pages, where the compressed images are
        middle = len(data) // 3
        data[middle : middle + 256] = bytes(b ^ 0xFF for b in data[middle : middle + 256])
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    shard.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"shard-00001\.parquet is corrupted or truncated"):
        read_documents(corpus)


def test_a_damaged_table_or_manifest_is_named(corpus: Path) -> None:
    (corpus / "quarantine.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CorpusError, match=r"quarantine\.parquet is corrupted or truncated"):
        read_quarantine(corpus)
    table = corpus / "tasks" / "vqa.parquet"
    table.write_bytes(table.read_bytes()[:-10])
    with pytest.raises(CorpusError, match=r"vqa\.parquet is corrupted or truncated"):
        read_task_table(corpus, "vqa")
    manifest = corpus / "manifest.json"
    manifest.write_text('{"format_version": ')
    with pytest.raises(CorpusError, match=r"manifest\.json is not valid JSON"):
        read_manifest(corpus)
    manifest.write_text("[1, 2]")
    with pytest.raises(CorpusError, match=r"manifest\.json is not a corpus manifest"):
        read_manifest(corpus)
