"""The corpus artifact: sharded Parquet documents plus task tables (DESIGN.md §3-4).

Layout of a corpus folder (written atomically by :func:`write_corpus`)::

    corpus/
      manifest.json            format version, source, image size, counts, shard list
      shard-00000.parquet      documents, ``shard_size`` rows per shard (schema: DOCUMENT_SCHEMA)
      ...
      tasks/vqa.parquet        derived task tables (schemas: cm3leon.tasks); empty for user data
      tasks/edits.parquet
      tasks/grounding.parquet
      tasks/segmentation.parquet
      quarantine.parquet       invalid user rows kept aside (schema: QUARANTINE_SCHEMA)

Images are stored as raw row-major ``uint8`` RGB bytes of shape ``(height, width, 3)`` in the
``image`` column (masks as ``(height, width)`` bytes), so reading needs no image decoder and the
bytes hash identically across machines. Shards are read in a streaming fashion with
:func:`iter_documents`, one Arrow record batch at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cm3leon.artifacts import atomic_dir, atomic_write_json
from cm3leon.tasks import TABLE_TASKS

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")

DOCUMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("caption", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("image_sha256", pa.string()),
        ("source", pa.string()),
        ("source_path", pa.string()),  # original file for user data; null for ShapeWorld
        ("objects", pa.string()),  # ShapeWorld ground truth as JSON; null for user data
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("row", pa.string()),
        ("id", pa.string()),  # the row's document id where it has one ("" where it has none)
        ("path", pa.string()),
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class CorpusRecord:
    """One image-caption document. ``image`` is ``(H, W, 3)`` uint8 RGB."""

    id: str
    split: str
    caption: str
    captions: tuple[str, ...]
    image: np.ndarray
    source: str
    source_path: str | None = None
    objects: str | None = None

    def to_row(self) -> dict[str, Any]:
        image = np.ascontiguousarray(self.image, dtype=np.uint8)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"document {self.id}: image must be (H, W, 3), got {image.shape}")
        raw = image.tobytes()
        return {
            "id": self.id,
            "split": self.split,
            "caption": self.caption,
            "captions": list(self.captions),
            "image": raw,
            "height": image.shape[0],
            "width": image.shape[1],
            "channels": 3,
            "image_sha256": hashlib.sha256(raw).hexdigest(),
            "source": self.source,
            "source_path": self.source_path,
            "objects": self.objects,
        }


def image_sha256(image: np.ndarray) -> str:
    """Hash of an image's raw bytes, as stored in the ``image_sha256`` column."""
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def write_corpus(
    out_dir: str | Path,
    records: Sequence[CorpusRecord],
    *,
    source: str,
    image_size: int,
    shard_size: int,
    tasks: dict[str, list[dict[str, Any]]] | None = None,
    quarantine: Iterable[dict[str, Any]] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write documents, task tables and quarantine rows as one atomic corpus folder.

    Returns the manifest that was written. Output bytes depend only on the inputs, so the same
    records give byte-identical shards.
    """
    tasks = tasks or {}
    unknown = set(tasks) - set(TABLE_TASKS)
    if unknown:
        raise ValueError(f"unknown task tables {sorted(unknown)}; known: {list(TABLE_TASKS)}")
    quarantine = list(quarantine)
    with atomic_dir(out_dir) as tmp:
        shard_names = []
        for start in range(0, max(len(records), 1), shard_size):
            chunk = records[start : start + shard_size]
            if not chunk:
                break
            name = f"shard-{len(shard_names):05d}.parquet"
            table = pa.Table.from_pylist([r.to_row() for r in chunk], schema=DOCUMENT_SCHEMA)
            _write_table(table, tmp / name)
            shard_names.append(name)
        (tmp / "tasks").mkdir()
        task_counts = {}
        for name, spec in TABLE_TASKS.items():
            rows = tasks.get(name, [])
            _write_table(
                pa.Table.from_pylist(rows, schema=spec.table_schema),
                tmp / "tasks" / f"{name}.parquet",
            )
            task_counts[name] = len(rows)
        _write_table(
            pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), tmp / "quarantine.parquet"
        )
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "image_size": image_size,
            "num_documents": len(records),
            "splits": {s: sum(r.split == s for r in records) for s in SPLITS},
            "shards": shard_names,
            "tasks": task_counts,
            "quarantined": len(quarantine),
            **(extra or {}),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def _write_table(table: pa.Table, path: Path) -> None:
    # No statistics timestamps or pandas metadata: bytes depend on content only.
    pq.write_table(table, path, compression="zstd", write_statistics=True, store_schema=True)


class CorpusError(ValueError):
    """The corpus folder is missing, of another format version, or malformed."""


def read_manifest(corpus_dir: str | Path) -> dict[str, Any]:
    path = Path(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise CorpusError(f"{path} not found: is {corpus_dir} a corpus folder written by prepare?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorpusError(f"{path} is not valid JSON ({err}); rerun the prepare stage") from None
    if not isinstance(manifest, dict):
        raise CorpusError(f"{path} is not a corpus manifest (a JSON object); rerun prepare")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorpusError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION};"
            " rerun the prepare stage"
        )
    return manifest


def shard_paths(corpus_dir: str | Path) -> list[Path]:
    manifest = read_manifest(corpus_dir)
    paths = [Path(corpus_dir) / name for name in manifest["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CorpusError(f"corpus shards listed in manifest.json are missing: {missing}")
    return paths


def iter_documents(
    corpus_dir: str | Path,
    columns: Sequence[str] | None = None,
    *,
    split: str | None = None,
    batch_size: int = 1024,
) -> Iterator[pa.RecordBatch]:
    """Stream document record batches shard by shard, optionally only one split."""
    read_columns = None if columns is None else list(dict.fromkeys([*columns, "split"]))
    for path in shard_paths(corpus_dir):
        with _naming(path):
            batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=read_columns)
        while True:
            with _naming(path):
                batch = next(batches, None)
            if batch is None:
                break
            if split is not None:
                batch = batch.filter(pc.equal(batch.column("split"), split))
            if columns is not None and "split" not in columns:
                batch = batch.drop_columns(["split"])
            if batch.num_rows:
                yield batch


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Reading a corrupted or truncated Parquet file (pyarrow: ``ArrowInvalid: Parquet magic
    bytes not found``, ``OSError: ZSTD decompression failed``) is a CorpusError naming it."""
    try:
        yield
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(
            f"{path} is corrupted or truncated ({type(err).__name__}: {err}); restore it "
            "(dvc checkout) or rerun the prepare stage (dvc repro -f prepare)"
        ) from None


def read_documents(
    corpus_dir: str | Path, columns: Sequence[str] | None = None, *, split: str | None = None
) -> pa.Table:
    """All documents (or one split) as one Arrow table; use :func:`iter_documents` for streaming."""
    batches = list(iter_documents(corpus_dir, columns, split=split))
    if batches:
        return pa.Table.from_batches(batches)
    schema = (
        DOCUMENT_SCHEMA
        if columns is None
        else pa.schema([DOCUMENT_SCHEMA.field(c) for c in columns])
    )
    return schema.empty_table()


def read_task_table(corpus_dir: str | Path, name: str) -> pa.Table:
    if name not in TABLE_TASKS:
        raise CorpusError(f"unknown task table {name!r}; known: {list(TABLE_TASKS)}")
    path = Path(corpus_dir) / "tasks" / f"{name}.parquet"
    if not path.is_file():
        raise CorpusError(f"task table {path} not found")
    with _naming(path):
        return pq.read_table(path)


def read_quarantine(corpus_dir: str | Path) -> pa.Table:
    path = Path(corpus_dir) / "quarantine.parquet"
    with _naming(path):
        return pq.read_table(path)


def decode_images(batch: pa.RecordBatch | pa.Table, column: str = "image") -> np.ndarray:
    """Turn a batch's raw image bytes into an ``(N, H, W, 3)`` uint8 array."""
    heights = batch.column("height").to_pylist()
    widths = batch.column("width").to_pylist()
    raws = batch.column(column).to_pylist()
    if not raws:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    if len(set(heights)) != 1 or len(set(widths)) != 1:
        raise CorpusError("images in one batch differ in size; the corpus should be uniform")
    shape = (heights[0], widths[0], 3)
    return np.stack([np.frombuffer(raw, dtype=np.uint8).reshape(shape) for raw in raws])
