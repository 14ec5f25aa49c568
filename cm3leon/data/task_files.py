"""Import the user's own task examples (``data.tasks``) into the corpus's task tables.

A pure library like :mod:`cm3leon.data.importers`: paths come in, rows of each task table
(:data:`cm3leon.tasks.TABLE_TASKS` schemas) and every invalid row come out; nothing is written.
Every row points at a corpus document, given either by ``image_id`` (the document's id, or the
raw COCO image id of a ``coco`` corpus: ``42`` means document ``coco-42``) or by ``image``, the
image path exactly as the documents' manifest or COCO file names it. A row whose document is
unknown or was itself set aside is invalid, like a row with a missing field or a bad image; the
caller applies ``data.on_invalid`` to all of them at once.

Formats (the ones people have):

- **VQA**: a VQAv2 pair — the questions JSON (``{"questions": [{question_id, image_id,
  question}]}``) and the annotations JSON (``{"annotations": [{question_id, answers: [{answer}],
  multiple_choice_answer, answer_type}]}``): the training answer is ``multiple_choice_answer``,
  all ten human answers are kept for the official accuracy; or a manifest (CSV / Parquet /
  JSON lines) with ``image`` or ``image_id``, ``question``, and ``answer`` (one) or ``answers``
  (a list; in a CSV a JSON array), optional ``question_type``.
- **Editing**: a manifest with ``image`` (or ``image_id``), ``instruction``, ``target`` (the
  edited image's path), optional ``edit_type``.
- **Segmentation**: a manifest with ``image`` (or ``image_id``), ``instruction``, ``mask`` (an
  image file, nonzero inside the mask; resized and cropped exactly like the image).
- **Grounding**: a COCO instances JSON (``images``, ``annotations`` with ``bbox`` ``[x, y, w,
  h]`` and ``category_id``, ``categories``): one row per image, prompting ``a <category> in box
  (x0, y0, x1, y1) and ...`` for its ``max_boxes`` largest boxes (largest first, the rest left
  out of the prompt and counted in the import summary), in the pixel frame of the preprocessed
  image (resized on the shorter side and center-cropped; boxes clipped to it, a box entirely
  cropped away is left out).

Rows are named as in the documents' importers: ``file:row`` with 1-based data rows for
manifests and ``questions[i]`` / ``annotations[k]`` / ``images[i]`` for JSON files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon.config import TaskFilesConfig
from cm3leon.data.corpus import CorpusRecord
from cm3leon.data.importers import (
    DatasetError,
    InvalidRow,
    _blank,
    _ident,
    _open_image,
    _root,
    _short,
    _text,
    read_json,
    read_rows,
)


@dataclass
class TaskImport:
    """Rows of each task table the files fill, and every invalid input row."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    invalid: list[InvalidRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was shortened, e.g. boxes left out


class _Documents:
    """Resolves a task row's reference to a corpus document id."""

    def __init__(self, records: Sequence[CorpusRecord]) -> None:
        self.ids = {r.id for r in records}
        self.by_path = {r.source_path: r.id for r in records if r.source_path}

    def by_id(self, value: Any) -> tuple[str | None, str | None]:
        ident = _ident(value)
        if ident is None:
            return None, f"image_id must be text or an integer, got {_short(value)}"
        for candidate in (ident, f"coco-{ident}"):
            if candidate in self.ids:
                return candidate, None
        return None, f"image_id {ident!r} is not a document of the corpus (or it was set aside)"

    def resolve(self, row: dict[str, Any]) -> tuple[str | None, str | None]:
        if not _blank(row.get("image_id")):
            return self.by_id(row["image_id"])
        path, problem = _text(row.get("image"), "image path")
        if problem:
            return None, f"needs image_id or image ({problem})"
        doc = self.by_path.get(path)
        if doc is None:
            return None, f"image {path!r} is not a document of the corpus (or it was set aside)"
        return doc, None


def load_task_files(
    config: TaskFilesConfig,
    records: Sequence[CorpusRecord],
    image_size: int,
) -> TaskImport:
    """Read every task file ``config`` names against the corpus documents ``records``."""
    docs = _Documents(records)
    out = TaskImport()
    if config.vqa is not None:
        if config.vqa.lower().endswith(".json"):
            _vqa_v2(Path(config.vqa), Path(config.vqa_annotations), docs, out)
        else:
            _vqa_manifest(Path(config.vqa), docs, out)
    if config.editing is not None:
        _editing(Path(config.editing), config.root, docs, image_size, out)
    if config.segmentation is not None:
        _segmentation(Path(config.segmentation), config.root, docs, image_size, out)
    if config.grounding is not None:
        _grounding(Path(config.grounding), docs, image_size, config.grounding_max_boxes, out)
    return out


# --- manifests ----------------------------------------------------------------------------------


def _manifest(path: Path, required: Sequence[str], what: str) -> list[tuple[str, Any]]:
    file = str(path)
    columns, rows = read_rows(path, f"{what} manifest")
    found = ", ".join(repr(c) for c in columns) or "none"
    missing = [c for c in required if c not in columns]
    if "image" not in columns and "image_id" not in columns:
        missing.insert(0, "image (or image_id)")
    if missing:
        raise DatasetError(
            f"{file}: missing required column {', '.join(missing)}; found columns: {found}"
        )
    return rows


def _row_problems(row: Any, docs: _Documents, texts: Sequence[str]) -> tuple[dict, list[str]]:
    """The document and the stripped text fields of a manifest row, or why not."""
    if isinstance(row, str):  # a JSON line that is not an object
        return {}, [row]
    doc, problem = docs.resolve(row)
    values, problems = {"image_id": doc}, [problem] if problem else []
    for name in texts:
        value, problem = _text(row.get(name), name)
        values[name] = value
        problems += [problem] if problem else []
    if None in row:
        problems.append(f"row has {len(row[None])} more values than the header")
    return values, problems


def _shown(row: Any) -> str:
    if not isinstance(row, dict):
        return ""
    given = row.get("image", row.get("image_id"))
    return "" if _blank(given) else str(given)


def _vqa_manifest(path: Path, docs: _Documents, out: TaskImport) -> None:
    rows = out.tables.setdefault("vqa", [])
    for label, row in _manifest(path, ("question",), "VQA"):
        values, problems = _row_problems(row, docs, ("question",))
        answers: list[str] = []
        if isinstance(row, dict):
            answers, problem = _answers(row)
            problems += [problem] if problem else []
        if problems:
            out.invalid.append(InvalidRow(str(path), label, _shown(row), "; ".join(problems)))
            continue
        kind = row.get("question_type")
        rows.append(
            {
                **values,
                "answer": answers[0],
                "answers": answers,
                "question_type": "" if _blank(kind) else str(kind).strip(),
            }
        )


def _answers(row: dict) -> tuple[list[str], str | None]:
    """``answers`` (a list, or a JSON array in a CSV cell) or else ``answer``; the first answer
    is the one trained on."""
    if not _blank(row.get("answers")):
        given = row["answers"]
        if isinstance(given, str):
            try:
                given = json.loads(given)
            except json.JSONDecodeError:
                return [], f"answers must be a JSON array of text, got {_short(row['answers'])}"
        if not isinstance(given, list) or not given:
            return [], f"answers must be a non-empty list of text, got {_short(row['answers'])}"
        answers = [a.strip() for a in given if isinstance(a, str) and a.strip()]
        if len(answers) != len(given):
            return [], f"answers must all be non-empty text, got {_short(given)}"
        return answers, None
    answer, problem = _text(row.get("answer"), "answer")
    return ([answer], None) if answer is not None else ([], f"needs answer or answers ({problem})")


def _vqa_v2(questions: Path, annotations: Path, docs: _Documents, out: TaskImport) -> None:
    rows = out.tables.setdefault("vqa", [])
    qs = _json_list(questions, "questions")
    anns = _json_list(annotations, "annotations")
    by_question: dict[str, tuple[str, dict]] = {}
    for k, ann in enumerate(anns):
        label = f"annotations[{k}]"
        qid = _ident(ann.get("question_id")) if isinstance(ann, dict) else None
        if qid is None:
            reason = "annotation must be an object with a question_id"
            out.invalid.append(InvalidRow(str(annotations), label, "", reason))
        elif by_question.setdefault(qid, (label, ann))[0] != label:
            first = by_question[qid][0]
            reason = f"duplicate question_id {qid!r} (first in {first})"
            out.invalid.append(InvalidRow(str(annotations), label, "", reason))
    used: set[str] = set()
    for i, q in enumerate(qs):
        label = f"questions[{i}]"
        if not isinstance(q, dict):
            out.invalid.append(InvalidRow(str(questions), label, "", "question must be an object"))
            continue
        doc, problem = docs.by_id(q.get("image_id"))
        problems = [problem] if problem else []
        question, problem = _text(q.get("question"), "question")
        problems += [problem] if problem else []
        qid = _ident(q.get("question_id"))
        ann = by_question.get(qid)[1] if qid in by_question else None
        answer, answers, kind = None, [], ""
        if ann is None:
            problems.append(f"question_id {_short(q.get('question_id'))} has no annotation")
        else:
            used.add(qid)
            answer, problem = _text(ann.get("multiple_choice_answer"), "multiple_choice_answer")
            problems += [problem] if problem else []
            given = ann.get("answers")
            answers = [
                a["answer"].strip()
                for a in given or []
                if isinstance(a, dict) and isinstance(a.get("answer"), str) and a["answer"].strip()
            ]
            if not isinstance(given, list) or not answers or len(answers) != len(given):
                problems.append(f"answers must be a list of {{answer: text}}, got {_short(given)}")
            kind = str(ann.get("answer_type") or ann.get("question_type") or "")
        if problems:
            shown = "" if _blank(q.get("image_id")) else str(q.get("image_id"))
            out.invalid.append(InvalidRow(str(questions), label, shown, "; ".join(problems)))
            continue
        rows.append(
            {
                "image_id": doc,
                "question": question,
                "answer": answer,
                "answers": answers,
                "question_type": kind,
            }
        )
    for qid, (label, _) in by_question.items():
        if qid not in used:
            reason = f"question_id {qid!r} is not in {questions}"
            out.invalid.append(InvalidRow(str(annotations), label, "", reason))


def _json_list(path: Path, key: str) -> list:
    file = str(path)
    data = read_json(path, f"{key} JSON")
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"{file}: expected a JSON object with a list {key!r}; found {found}")
    return data[key]


def _editing(path: Path, root, docs: _Documents, size: int, out: TaskImport) -> None:
    def row(values: dict, given: dict, target: np.ndarray) -> dict:
        kind = given.get("edit_type")
        return {
            **values,
            "edit_type": "" if _blank(kind) else str(kind).strip(),
            "target_image": np.ascontiguousarray(target, np.uint8).tobytes(),
            "target_objects": None,
        }

    _image_task(path, root, docs, size, out, "edits", "target", lambda rgb: (rgb, None), row)


def _segmentation(path: Path, root, docs: _Documents, size: int, out: TaskImport) -> None:
    def mask(rgb: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        # the same resize and crop as the image; inside = any channel at half or more
        inside = rgb.max(axis=2) >= 128
        if not inside.any():
            return None, "the mask is empty after resizing to the corpus image size"
        return np.where(inside, 255, 0).astype(np.uint8), None

    def row(values: dict, _given: dict, pixels: np.ndarray) -> dict:
        return {**values, "mask": pixels.tobytes(), "target_object": None}

    _image_task(path, root, docs, size, out, "segmentation", "mask", mask, row)


def _image_task(path: Path, root, docs, size: int, out: TaskImport, table, column, convert, row):
    """A manifest of ``image``, ``instruction`` and an image file in ``column`` (relative to
    ``root``), loaded like the documents' images and turned into the stored pixels by
    ``convert`` (or a reason it cannot be); ``row`` makes the table row."""
    rows = out.tables.setdefault(table, [])
    base = _root(path.parent if root is None else root, str(path), "task image root")
    for label, given in _manifest(path, ("instruction", column), table):
        values, problems = _row_problems(given, docs, ("instruction",))
        pixels = None
        if isinstance(given, dict):
            name, problem = _text(given.get(column), f"{column} image path")
            if problem is None:
                rgb, problem = _open_image(base, name, size)
                if problem is None:
                    pixels, problem = convert(rgb)
            problems += [f"{column}: {problem}"] if problem else []
        if problems:
            out.invalid.append(InvalidRow(str(path), label, _shown(given), "; ".join(problems)))
            continue
        rows.append(row(values, given, pixels))


def _grounding(path: Path, docs: _Documents, size: int, max_boxes: int, out: TaskImport) -> None:
    """COCO instances -> one prompt per image listing its largest boxes."""
    file = str(path)
    images = _json_list(path, "images")
    anns = _json_list(path, "annotations")
    categories = {}
    for c in _json_list(path, "categories"):
        if isinstance(c, dict) and isinstance(c.get("name"), str) and _ident(c.get("id")):
            categories[_ident(c["id"])] = c["name"].strip()
    boxes: dict[str, list[tuple[float, str, list[float]]]] = {}
    for k, ann in enumerate(anns):
        label = f"annotations[{k}]"
        problem = None
        if not isinstance(ann, dict):
            problem = "annotation must be a JSON object"
        else:
            box = ann.get("bbox")
            name = categories.get(_ident(ann.get("category_id")))
            if name is None:
                problem = f"unknown category_id {_short(ann.get('category_id'))}"
            elif (
                not isinstance(box, list)
                or len(box) != 4
                or not all(isinstance(v, int | float) for v in box)
                or box[2] <= 0
                or box[3] <= 0
            ):
                problem = f"bbox must be [x, y, width, height], sizes > 0, got {_short(box)}"
        if problem:
            out.invalid.append(InvalidRow(file, label, "", problem))
            continue
        image_key = _ident(ann.get("image_id"))
        boxes.setdefault(image_key, []).append((box[2] * box[3], name, [float(v) for v in box]))
    rows = out.tables.setdefault("grounding", [])
    left_out = 0
    for i, entry in enumerate(images):
        label = f"images[{i}]"
        if not isinstance(entry, dict):
            out.invalid.append(InvalidRow(file, label, "", "image entry must be a JSON object"))
            continue
        key = _ident(entry.get("id"))
        if key not in boxes:
            continue  # an image without boxes has nothing to ground (COCO lists every image)
        doc, problem = docs.by_id(entry.get("id"))
        if doc is None and isinstance(entry.get("file_name"), str):
            doc = docs.by_path.get(entry["file_name"])
        width, height = entry.get("width"), entry.get("height")
        if doc is None:
            problem = problem or "not a document of the corpus"
        elif not all(isinstance(v, int | float) and v > 0 for v in (width, height)):
            problem = f"width and height must be positive numbers, got {_short([width, height])}"
        if doc is None or problem:
            shown = entry.get("file_name") if isinstance(entry.get("file_name"), str) else ""
            out.invalid.append(InvalidRow(file, label, shown, problem))
            continue
        parts = []
        for _, name, box in sorted(boxes[key], key=lambda b: -b[0]):
            mapped = _crop_box(box, float(width), float(height), size)
            if mapped is not None and len(parts) < max_boxes:
                parts.append(f"a {name} in box ({', '.join(str(v) for v in mapped)})")
            else:
                left_out += 1
        if not parts:
            reason = "every box lies outside the center crop of the preprocessed image"
            out.invalid.append(InvalidRow(file, label, entry.get("file_name", ""), reason, doc))
            continue
        rows.append({"image_id": doc, "prompt": " and ".join(parts), "objects": None})
    if left_out:
        out.notes.append(
            f"{file}: {left_out} boxes left out of grounding prompts (beyond the "
            f"{max_boxes} largest of an image, or cropped away)"
        )


def _crop_box(box: list[float], width: float, height: float, size: int) -> tuple | None:
    """``[x, y, w, h]`` in the original image -> ``(x0, y0, x1, y1)`` integer pixels of the
    preprocessed ``size`` x ``size`` image (:func:`~cm3leon.data.importers.load_image`'s resize
    and center crop), end exclusive and clipped; ``None`` if nothing of it is left."""
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    sx, sy = new_w / width, new_h / height
    left, top = (new_w - size) // 2, (new_h - size) // 2
    x0 = int(np.clip(np.floor(box[0] * sx - left), 0, size))
    y0 = int(np.clip(np.floor(box[1] * sy - top), 0, size))
    x1 = int(np.clip(np.ceil((box[0] + box[2]) * sx - left), 0, size))
    y1 = int(np.clip(np.ceil((box[1] + box[3]) * sy - top), 0, size))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None
