"""Import user image-caption data: manifests (CSV / Parquet / JSON lines) and COCO captions.

A pure library: every path is passed in explicitly and nothing is written. Both importers return
an :class:`ImportResult` holding the valid documents as :class:`CorpusRecord` s (in input order)
and *every* invalid row as an :class:`InvalidRow` (never only the first one, never silently
dropped); :func:`apply_invalid_policy` then fails on them or sets them aside for quarantine.

Manifests (:func:`load_manifest`) need columns ``image`` (a path relative to ``root``, which
defaults to the manifest's folder) and ``caption``; ``id`` and ``split`` are optional. A missing
or empty ``id`` becomes ``row-{n}``; a missing or empty ``split`` stays ``None`` for the caller to
assign. Row numbers are 1-based data row numbers: the N-th data record of a CSV (header not
counted, so line N+1 when no field spans lines) or of a Parquet table, and line N of a JSON-lines
file. Blank lines are skipped but still counted. CSV cells are always text (a caption ``42`` is
the text "42"); Parquet and JSON lines keep their types, so a number, list or null caption is
invalid. Captions, ids and splits are stripped of surrounding whitespace.

COCO (:func:`load_coco`) gives one document per image, ``coco-{image_id}``, with all its valid
captions in annotation order; rows are named ``images[i]`` / ``annotations[k]`` (0-based).

Images (:func:`load_image`) are fully decoded (so truncated files fail), EXIF-rotated, converted
to RGB (transparency is composited on white; 16-bit grayscale is scaled to 8 bits), resized so
the shorter side is ``image_size`` with Lanczos and center-cropped to a square.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from cm3leon.data.corpus import SPLITS, CorpusRecord, image_sha256

MANIFEST_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl"}
REQUIRED_COLUMNS = ("image", "caption")
CAPTION_CHARS = (1, 512)  # ValidateConfig's default caption bounds
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto


class DatasetError(ValueError):
    """A manifest or COCO file as a whole is unusable; the message names the file and problem."""


class ImageError(ValueError):
    """An image file cannot be used; the message is the reason."""


@dataclass(frozen=True)
class InvalidRow:
    """One rejected input row; ``as_dict()`` matches ``QUARANTINE_SCHEMA``."""

    file: str
    row: str
    path: str
    reason: str
    id: str = ""  # the document id the row gives (or would have had), "" where it has none

    def as_dict(self) -> dict[str, str]:
        return {
            "file": self.file,
            "row": self.row,
            "id": self.id,
            "path": self.path,
            "reason": self.reason,
        }

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.path or '-'}: {self.reason}"


@dataclass
class ImportResult:
    records: list[CorpusRecord] = field(default_factory=list)
    invalid: list[InvalidRow] = field(default_factory=list)


class InvalidRowsError(ValueError):
    """Raised by :func:`apply_invalid_policy` with ``fail``; lists every invalid row."""

    def __init__(self, invalid: list[InvalidRow]) -> None:
        self.invalid = list(invalid)
        n = len(self.invalid)
        files = ", ".join(dict.fromkeys(r.file for r in self.invalid))
        lines = "\n".join(f"  {r}" for r in self.invalid)
        super().__init__(
            f"{n} invalid row{'s' if n != 1 else ''} in {files}:\n{lines}\n"
            f"{n} invalid row{'s' if n != 1 else ''} in total: fix them, or set"
            " data.on_invalid: quarantine to set them aside (kept in quarantine.parquet)"
        )


def apply_invalid_policy(
    result: ImportResult, policy: Literal["fail", "quarantine"]
) -> tuple[list[CorpusRecord], list[dict[str, str]]]:
    """Return ``(records, quarantine rows)``; with ``fail`` any invalid row raises."""
    if policy not in ("fail", "quarantine"):
        raise ValueError(f"unknown invalid-row policy {policy!r}; expected 'fail' or 'quarantine'")
    if result.invalid and policy == "fail":
        raise InvalidRowsError(result.invalid)
    return list(result.records), [r.as_dict() for r in result.invalid]


# --- images ---------------------------------------------------------------------------------


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode ``path`` to a ``(image_size, image_size, 3)`` uint8 RGB array or raise ImageError."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    try:
        with Image.open(path) as img:
            img.load()  # full decode: truncated data fails here, not later
            rgb = _to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except UnidentifiedImageError:
        raise ImageError("cannot decode image: not a recognized image format") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"image too large: {err}") from None
    except Exception as err:  # any decoder failure on a user's file is a bad image, not a crash
        raise ImageError(f"cannot decode image: truncated or corrupt image data ({err})") from None
    width, height = rgb.size
    scale = image_size / min(width, height)
    size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    rgb = rgb.crop((left, top, left + image_size, top + image_size))
    return np.array(rgb, dtype=np.uint8).reshape(image_size, image_size, 3)


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if img.mode != "F":  # 16-bit data (I;16*, and "I" as Pillow opens 16-bit files)
            values = values / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    try:
        if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
            img = Image.alpha_composite(background, rgba)
        return img.convert("RGB")
    except ValueError as err:
        raise ImageError(f"unsupported image mode {img.mode} ({err})") from None


# --- shared row checks ------------------------------------------------------------------------


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any, what: str) -> tuple[str | None, str | None]:
    """``(stripped text, None)`` or ``(None, problem)``."""
    if _missing(value):
        return None, f"{what} is missing ({'NaN' if value is not None else 'null'})"
    if not isinstance(value, str):
        return None, f"{what} must be text, got {type(value).__name__} {_short(value)}"
    if not value.strip():
        return None, f"{what} is empty"
    return value.strip(), None


def _caption(value: Any, chars: tuple[int, int]) -> tuple[str | None, str | None]:
    """A caption as :func:`_text`, within the validation gate's length bounds ``chars``
    (``validate.caption_min_chars``, ``validate.caption_max_chars``): a row the gate would fail
    is set aside here, named, instead of failing the whole corpus later."""
    caption, problem = _text(value, "caption")
    if caption is not None and not chars[0] <= len(caption) <= chars[1]:
        bound = "max" if len(caption) > chars[1] else "min"
        limit = chars[1] if bound == "max" else chars[0]
        return None, (
            f"caption has {len(caption)} characters; validate.caption_{bound}_chars is {limit}"
        )
    return caption, problem


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _blank(value: Any) -> bool:
    return _missing(value) or (isinstance(value, str) and not value.strip())


def _ident(value: Any) -> str | None:
    """An id as text: integers and non-empty strings are accepted, anything else is not."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _open_image(root: Path, given: str, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """Load ``given`` (relative to the resolved ``root``) or say why not; nothing may escape
    ``root``, whether by an absolute path, ``..`` or a symlink."""
    try:
        resolved = (root / given).resolve()
    except (OSError, ValueError, RuntimeError) as err:
        return None, f"invalid image path ({err})"
    if not resolved.is_relative_to(root):
        return None, f"image path escapes the dataset root {root} (resolves to {resolved})"
    if not resolved.exists():
        return None, f"image file not found (looked for {resolved})"
    if not resolved.is_file():
        return None, f"image path is not a regular file ({resolved})"
    try:
        return load_image(resolved, image_size), None
    except ImageError as err:
        return None, str(err).replace("\n", " ")


def _root(folder: str | Path, file: str, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{file}: {what} {folder} is not an existing folder")
    return folder.resolve()


# --- manifests --------------------------------------------------------------------------------

Rows = list[tuple[str, Any]]  # (row label, mapping of column -> value, or a problem string)


def _read_csv(path: Path) -> tuple[list[str], Rows]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path}: the file is empty (no header row)")
        rows: Rows = []
        for n, values in enumerate(reader, start=1):
            if not values:  # csv yields [] for a blank line
                continue
            row: dict[Any, Any] = dict(zip(header, values, strict=False))
            if len(values) > len(header):
                row[None] = values[len(header) :]
            rows.append((str(n), row))
    return header, rows


def _read_parquet(path: Path) -> tuple[list[str], Rows]:
    table = pq.read_table(path)
    return table.column_names, [(str(n), row) for n, row in enumerate(table.to_pylist(), 1)]


def _read_jsonl(path: Path) -> tuple[list[str], Rows]:
    columns: dict[str, None] = {}
    rows: Rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append((str(n), f"not valid JSON ({err})"))
            continue
        if not isinstance(obj, dict):
            rows.append((str(n), f"not a JSON object (got {type(obj).__name__})"))
            continue
        columns.update(dict.fromkeys(obj))
        rows.append((str(n), obj))
    if not rows:  # an empty file is an empty dataset, not one with missing columns
        columns.update(dict.fromkeys(REQUIRED_COLUMNS))
    return list(columns), rows


_READERS = {"csv": _read_csv, "parquet": _read_parquet, "jsonl": _read_jsonl}


def read_json(path: Path, what: str, kind: str = "JSON") -> Any:
    """The parsed JSON file ``path`` (``what`` and ``kind`` name it in errors): a missing or
    unreadable file is a :class:`DatasetError` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read {kind}: {err}") from None


def read_rows(path: Path, what: str = "manifest") -> tuple[list[str], Rows]:
    """The column names and ``(row label, row)`` pairs of a CSV / Parquet / JSON-lines file
    (``what`` names it in errors); an unknown extension, a missing or unreadable file and
    duplicated column names are :class:`DatasetError` s naming the file."""
    file = str(path)
    kind = MANIFEST_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(
            f"{file}: unknown {what} extension {path.suffix!r};"
            f" expected one of {', '.join(MANIFEST_FORMATS)}"
        )
    if not path.is_file():
        raise DatasetError(f"{file}: {what} file not found")
    try:
        columns, rows = _READERS[kind](path)
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException) as err:
        raise DatasetError(f"{file}: cannot read the {kind} {what}: {err}") from None
    if len(set(columns)) != len(columns):
        found = ", ".join(repr(c) for c in columns) or "none"
        raise DatasetError(f"{file}: duplicated column names; found columns: {found}")
    return columns, rows


def load_manifest(
    path: str | Path,
    root: str | Path | None = None,
    image_size: int = 32,
    caption_chars: tuple[int, int] = CAPTION_CHARS,
) -> ImportResult:
    """Load a CSV / Parquet / JSON-lines manifest; see the module docstring for the rules.
    ``caption_chars``: the (min, max) caption length a row may have."""
    path = Path(path)
    file = str(path)
    columns, rows = read_rows(path)
    root_dir = _root(path.parent if root is None else root, file, "dataset root")
    found = ", ".join(repr(c) for c in columns) or "none"
    missing = ", ".join(repr(c) for c in REQUIRED_COLUMNS if c not in columns)
    if missing:
        raise DatasetError(f"{file}: missing required column {missing}; found columns: {found}")
    result = ImportResult()
    first_row_of_id: dict[str, str] = {}
    split_of_image: dict[str, tuple[str, str]] = {}  # sha256 -> (row, split) of accepted rows
    for label, row in rows:
        if isinstance(row, str):  # a JSON line that is not an object
            result.invalid.append(InvalidRow(file, label, "", row))
            continue
        given = row.get("image")
        image_path, path_problem = _text(given, "image path")
        caption, caption_problem = _caption(row.get("caption"), caption_chars)
        problems = [p for p in (path_problem, caption_problem) if p]
        split = None if _blank(row.get("split")) else row["split"]
        if split is not None and (not isinstance(split, str) or split.strip() not in SPLITS):
            problems.append(f"split {_short(split)} is not one of {', '.join(SPLITS)}")
            split = None
        split = split.strip() if split is not None else None
        record_id = f"row-{label}" if _blank(row.get("id")) else _ident(row["id"])
        if record_id is None:
            problems.append(f"id must be text or an integer, got {_short(row['id'])}")
        elif first_row_of_id.setdefault(record_id, label) != label:
            problems.append(
                f"duplicate id {record_id!r} (first used in row {first_row_of_id[record_id]})"
            )
        if None in row:
            problems.append(f"row has {len(row[None])} more values than the header")
        image = None
        if image_path is not None:
            image, problem = _open_image(root_dir, image_path, image_size)
            problems += [problem] if problem else []
        if image is not None and split is not None and not problems:
            earlier = split_of_image.setdefault(image_sha256(image), (label, split))
            if earlier[1] != split:
                problems.append(
                    f"same image (identical pixels after preprocessing) as row {earlier[0]},"
                    f" which has split {earlier[1]!r}; an image may be in one split only"
                )
        if problems or image is None:
            shown = given if isinstance(given, str) else ("" if _missing(given) else repr(given))
            reason = "; ".join(problems)
            result.invalid.append(InvalidRow(file, label, shown, reason, record_id or ""))
            continue
        result.records.append(
            CorpusRecord(
                id=record_id,
                split=split,  # type: ignore[arg-type]  # None: the caller assigns splits
                caption=caption,
                captions=(caption,),
                image=image,
                source="manifest",
                source_path=image_path,
            )
        )
    return result


# --- COCO -------------------------------------------------------------------------------------


def load_coco(
    annotations_json: str | Path,
    images_dir: str | Path,
    image_size: int = 32,
    caption_chars: tuple[int, int] = CAPTION_CHARS,
) -> ImportResult:
    """Load a COCO captions file: one document per image with all of its valid captions
    (each within ``caption_chars``, the (min, max) caption length).

    Image ids are matched as text (``1`` and ``"1"`` are the same image). Invalid annotations
    (unknown image id, bad caption) are reported as ``annotations[k]`` after the invalid images.
    """
    path = Path(annotations_json)
    file = str(path)
    data = read_json(path, "COCO annotations", "COCO JSON")
    if not isinstance(data, dict):
        raise DatasetError(f"{file}: top level must be a JSON object with images and annotations")
    for key in ("images", "annotations"):
        if key not in data:
            raise DatasetError(f"{file}: missing top-level key {key!r}; found: {sorted(data)}")
        if not isinstance(data[key], list):
            raise DatasetError(f"{file}: {key!r} must be a list, got {type(data[key]).__name__}")
    root_dir = _root(images_dir, file, "COCO image folder")

    entries: list[tuple[str, str | None, Any, list[str]]] = []  # label, id, file_name, problems
    label_of_id: dict[str, str] = {}
    for i, entry in enumerate(data["images"]):
        label, problems = f"images[{i}]", []
        if not isinstance(entry, dict):
            entries.append((label, None, None, ["image entry must be a JSON object"]))
            continue
        image_id = _ident(entry.get("id"))
        if image_id is None:
            problems.append(f"image id must be an integer or text, got {_short(entry.get('id'))}")
        elif label_of_id.setdefault(image_id, label) != label:
            first = label_of_id[image_id]
            problems.append(f"duplicate image id {image_id!r} (first used in {first})")
        file_name, problem = _text(entry.get("file_name"), "file_name")
        problems += [problem] if problem else []
        entries.append((label, image_id, file_name, problems))

    captions: dict[str, list[str]] = {}  # image label -> captions
    bad_annotations: list[InvalidRow] = []
    file_name_of = {label: name for label, _, name, _ in entries}
    for k, ann in enumerate(data["annotations"]):
        label = f"annotations[{k}]"
        if not isinstance(ann, dict):
            bad_annotations.append(InvalidRow(file, label, "", "annotation must be a JSON object"))
            continue
        image_id = _ident(ann.get("image_id"))
        owner = label_of_id.get(image_id) if image_id is not None else None
        if owner is None:
            reason = f"refers to unknown image id {_short(ann.get('image_id'))}"
            bad_annotations.append(InvalidRow(file, label, "", reason))
            continue
        caption, problem = _caption(ann.get("caption"), caption_chars)
        if problem:
            shown = file_name_of[owner] or ""
            bad_annotations.append(InvalidRow(file, label, shown, problem, f"coco-{image_id}"))
        else:
            captions.setdefault(owner, []).append(caption)

    result = ImportResult()
    for label, image_id, file_name, problems in entries:
        caps = captions.get(label, [])
        if not problems and not caps:
            problems.append("image has no valid caption")
        image = None
        if not problems:
            image, problem = _open_image(root_dir, file_name, image_size)
            problems += [problem] if problem else []
        if problems or image is None:
            reason = "; ".join(problems)
            if caps:
                reason += f" ({len(caps)} caption{'s' if len(caps) != 1 else ''} set aside)"
            ident = f"coco-{image_id}" if image_id is not None else ""
            result.invalid.append(InvalidRow(file, label, file_name or "", reason, ident))
            continue
        result.records.append(
            CorpusRecord(
                id=f"coco-{image_id}",
                split=None,  # type: ignore[arg-type]  # None: the caller assigns splits
                caption=caps[0],
                captions=tuple(caps),
                image=image,
                source="coco",
                source_path=file_name,
            )
        )
    result.invalid.extend(bad_annotations)
    return result
