"""The tokens artifact: every document and task row as ids in the shared vocabulary.

Layout of ``data/tokens/`` (written atomically by :func:`write_tokens`)::

    manifest.json        counts, code grid, and the fingerprints of the Vocab and VQ tokenizer
    vocab.json           the Vocab (rebuild it with ``Vocab.load(tokens_dir)``)
    train.parquet        documents of each split (schema: DOCUMENT_TOKENS_SCHEMA)
    val.parquet
    test.parquet
    tasks/vqa.parquet    task tables with their text and images tokenized (schemas: cm3leon.tasks)
    tasks/edits.parquet
    tasks/grounding.parquet
    tasks/segmentation.parquet

All ids are Vocab ids (text and image ranges), so later stages need nothing but a Vocab.
:func:`check_tokens` compares the stored fingerprints with the Vocab / VQ tokenizer a stage is
about to use and names the mismatch instead of training on wrongly offset ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cm3leon.artifacts import atomic_dir, atomic_write_json
from cm3leon.data.corpus import SPLITS
from cm3leon.tasks import IDS, TABLE_TASKS
from cm3leon.tokenizers.vocab import Vocab

FORMAT_VERSION = 1

DOCUMENT_TOKENS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("caption", pa.string()),
        ("caption_ids", IDS),
        ("paraphrase_ids", pa.list_(IDS)),  # every caption paraphrase, the primary one first
        ("image_ids", IDS),
        ("objects", pa.string()),  # ShapeWorld truth (JSON) for exact scoring; null otherwise
    ]
)


class TokensMismatchError(ValueError):
    """A tokens artifact was made with another Vocab or VQ tokenizer than the one in use."""


def write_tokens(
    out_dir: str | Path,
    documents: dict[str, list[dict[str, Any]]],
    tasks: dict[str, list[dict[str, Any]]],
    vocab: Vocab,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write the tokens folder atomically; returns its manifest."""
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            table = pa.Table.from_pylist(documents.get(split, []), schema=DOCUMENT_TOKENS_SCHEMA)
            pq.write_table(table, tmp / f"{split}.parquet", compression="zstd")
        (tmp / "tasks").mkdir()
        for name, spec in TABLE_TASKS.items():
            table = pa.Table.from_pylist(tasks.get(name, []), schema=spec.tokens_schema)
            pq.write_table(table, tmp / "tasks" / f"{name}.parquet", compression="zstd")
        vocab.save(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "vocab_fingerprint": vocab.fingerprint,
            "vocab_size": vocab.size,
            "documents": {s: len(documents.get(s, [])) for s in SPLITS},
            "tasks": {n: len(tasks.get(n, [])) for n in TABLE_TASKS},
            **extra,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def read_tokens_manifest(tokens_dir: str | Path) -> dict[str, Any]:
    path = Path(tokens_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the tokenize stage first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TokensMismatchError(
            f"{path}: tokens format {manifest.get('format_version')}, expected {FORMAT_VERSION};"
            " rerun the tokenize stage"
        )
    return manifest


def check_tokens(
    tokens_dir: str | Path, vocab: Vocab, vq_fingerprint: str | None = None
) -> dict[str, Any]:
    """Fail with a clear message unless ``tokens_dir`` was made with this Vocab (and VQ)."""
    manifest = read_tokens_manifest(tokens_dir)
    if manifest["vocab_fingerprint"] != vocab.fingerprint:
        raise TokensMismatchError(
            f"{tokens_dir} was tokenized with vocab {manifest['vocab_fingerprint']} but the vocab "
            f"in use is {vocab.fingerprint} (layout {vocab.to_dict()['size']} ids); rerun the "
            "stages after tokenize (`dvc repro`) so they read matching tokens"
        )
    if vq_fingerprint is not None and manifest["vq_fingerprint"] != vq_fingerprint:
        raise TokensMismatchError(
            f"{tokens_dir} was encoded by VQ tokenizer {manifest['vq_fingerprint']} but the one "
            f"in use is {vq_fingerprint}; its image ids mean different pictures — rerun tokenize"
        )
    return manifest


def read_split(tokens_dir: str | Path, split: str) -> pa.Table:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    return pq.read_table(Path(tokens_dir) / f"{split}.parquet")


def read_task_tokens(tokens_dir: str | Path, name: str) -> pa.Table:
    if name not in TABLE_TASKS:
        raise ValueError(f"unknown task table {name!r}; known: {list(TABLE_TASKS)}")
    return pq.read_table(Path(tokens_dir) / "tasks" / f"{name}.parquet")
