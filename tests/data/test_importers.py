"""Tests for cm3leon.data.importers: manifests, COCO, image preprocessing and invalid-row policy.

Everything is generated under ``tmp_path`` with Pillow; images are tiny so the file runs fast.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cm3leon.data.corpus import QUARANTINE_SCHEMA
from cm3leon.data.importers import (
    DatasetError,
    ImageError,
    ImportResult,
    InvalidRow,
    InvalidRowsError,
    apply_invalid_policy,
    load_coco,
    load_image,
    load_manifest,
)

SIZE = 32
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _noise(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _bands(width: int, height: int, outer: int, horizontal: bool) -> Image.Image:
    """A non-square image: ``outer``-pixel red/blue bands at both ends of the long side, green
    in the middle; a center crop of the shorter side keeps only green."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, :] = GREEN
    if horizontal:
        array[:, :outer], array[:, width - outer :] = RED, BLUE
    else:
        array[:outer, :], array[height - outer :, :] = RED, BLUE
    return Image.fromarray(array)


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    """A dataset root with good and bad images, plus an image and a symlink outside it."""
    root = tmp_path / "ds"
    img = root / "img"
    img.mkdir(parents=True)
    Image.fromarray(_noise(0, 40, 40)).save(img / "a.png")
    Image.fromarray(_noise(1, 40, 48)).save(img / "b.jpg", quality=95)
    _bands(64, 32, 16, horizontal=True).save(img / "wide.png")
    _bands(32, 64, 16, horizontal=False).save(img / "tall.png")
    Image.new("L", (32, 32), 100).save(img / "gray.png")
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[16:] = (*RED, 255)  # top half fully transparent, bottom half opaque red
    Image.fromarray(rgba).save(img / "rgba.png")
    shutil.copy(img / "a.png", img / "a_copy.png")
    (img / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    big = img / "big.png"
    Image.fromarray(_noise(2, 128, 128)).save(big)
    data = big.read_bytes()
    (img / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(_noise(3, 32, 32)).save(tmp_path / "outside.png")
    with contextlib.suppress(OSError):  # without symlink support the test uses ".." instead
        os.symlink(tmp_path / "outside.png", img / "link.png")
    return root


GOOD_ROWS = [
    {"id": "a", "image": "img/a.png", "caption": "a noisy square", "split": "train"},
    {"id": "b", "image": "img/b.jpg", "caption": "  a photo ", "split": "val"},
    {"id": None, "image": "img/wide.png", "caption": "wide", "split": "test"},
    {"id": "tall", "image": "img/tall.png", "caption": "tall", "split": None},
    {"id": "gray", "image": "img/gray.png", "caption": "gray", "split": "train"},
    {"id": "rgba", "image": "img/rgba.png", "caption": "rgba", "split": "train"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        lines = [json.dumps({k: v for k, v in r.items() if v is not None}) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_good_manifest_loads(ds: Path, suffix: str) -> None:
    manifest = _write(ds / f"manifest{suffix}", GOOD_ROWS)
    result = load_manifest(manifest, image_size=SIZE)
    assert result.invalid == []
    assert [r.id for r in result.records] == ["a", "b", "row-3", "tall", "gray", "rgba"]
    assert [r.caption for r in result.records] == [
        "a noisy square",
        "a photo",
        "wide",
        "tall",
        "gray",
        "rgba",
    ]
    assert [r.split for r in result.records] == ["train", "val", "test", None, "train", "train"]
    for record, row in zip(result.records, GOOD_ROWS, strict=True):
        assert record.image.shape == (SIZE, SIZE, 3)
        assert record.image.dtype == np.uint8
        assert record.captions == (record.caption,)
        assert record.source == "manifest"
        assert record.source_path == row["image"]
    images = {r.id: r.image for r in result.records}
    assert (images["row-3"] == GREEN).all()  # red/blue side bands cropped away
    assert (images["tall"] == GREEN).all()
    assert (images["gray"] == 100).all()
    assert (images["rgba"][:16] == WHITE).all()  # transparency composited on white
    assert (images["rgba"][16:] == RED).all()
    again = load_manifest(manifest, image_size=SIZE)
    assert [r.id for r in again.records] == [r.id for r in result.records]
    assert all(
        np.array_equal(x.image, y.image) for x, y in zip(again.records, result.records, strict=True)
    )


def test_explicit_root_and_both_policies_without_invalid_rows(ds: Path, tmp_path: Path) -> None:
    absolute_inside = {"id": "abs", "image": str(ds / "img" / "gray.png"), "caption": "ok"}
    manifest = _write(tmp_path / "elsewhere.jsonl", [*GOOD_ROWS[:2], absolute_inside])
    result = load_manifest(manifest, root=ds, image_size=SIZE)
    for policy in ("fail", "quarantine"):
        records, quarantine = apply_invalid_policy(result, policy)
        assert [r.id for r in records] == ["a", "b", "abs"]
        assert quarantine == []
    with pytest.raises(ValueError, match="unknown invalid-row policy"):
        apply_invalid_policy(result, "ignore")  # type: ignore[arg-type]


# Every invalid kind, one per JSON line: (row number, keywords the reason must contain).
def _invalid_manifest(ds: Path, tmp_path: Path) -> tuple[Path, dict[str, list[str]], int]:
    lines = [
        {"id": "a", "image": "img/a.png", "caption": "good", "split": "train"},  # 1
        {"image": "img/nope.png", "caption": "missing file"},  # 2
        {"image": "img/garbage.png", "caption": "garbage"},  # 3
        {"image": "img/truncated.png", "caption": "truncated"},  # 4
        {"image": "img/gray.png", "caption": "   "},  # 5
        {"image": "img/gray.png", "caption": 42},  # 6
        {"image": "img/gray.png", "caption": None},  # 7
        {"image": "img/gray.png", "caption": ["a", "list"]},  # 8
        '{"image": "img/gray.png", "caption": NaN}',  # 9
        {"id": "a", "image": "img/tall.png", "caption": "duplicate id"},  # 10
        {"image": str(tmp_path / "outside.png"), "caption": "absolute outside"},  # 11
        {"image": "../outside.png", "caption": "traversal"},  # 12
        {"image": "img/link.png", "caption": "symlink out"},  # 13
        {"image": "img/wide.png", "caption": "bad split", "split": "training"},  # 14
        {"id": "a2", "image": "img/a_copy.png", "caption": "same pixels", "split": "val"},  # 15
        "",  # 16: blank lines are skipped but counted
        "{not json",  # 17
        {"image": "img/nope.png", "caption": ""},  # 18: two problems in one row
        {"id": "b", "image": "img/b.jpg", "caption": "good too", "split": "val"},  # 19
    ]
    expected = {
        "2": ["not found"],
        "3": ["decode"],
        "4": ["truncated"],
        "5": ["caption is empty"],
        "6": ["caption must be text", "int"],
        "7": ["caption is missing"],
        "8": ["caption must be text", "list"],
        "9": ["caption is missing", "NaN"],
        "10": ["duplicate id 'a'", "row 1"],
        "11": ["escapes"],
        "12": ["escapes"],
        "13": ["escapes"],
        "14": ["split 'training'"],
        "15": ["same image", "row 1", "'train'"],
        "17": ["not valid JSON"],
        "18": ["not found", "caption is empty"],
    }
    if not (ds / "img" / "link.png").is_symlink():
        lines[12] = {"image": "../ds/../outside.png", "caption": "no symlinks here"}
    text = [x if isinstance(x, str) else json.dumps(x) for x in lines]
    path = ds / "bad.jsonl"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path, expected, sum(1 for x in lines if x != "")


@pytest.mark.parametrize("policy", ["fail", "quarantine"])
def test_every_invalid_kind_is_reported(ds: Path, tmp_path: Path, policy: str) -> None:
    manifest, expected, total = _invalid_manifest(ds, tmp_path)
    result = load_manifest(manifest, image_size=SIZE)
    assert [r.id for r in result.records] == ["a", "b"]
    assert [r.row for r in result.invalid] == list(expected)
    for bad in result.invalid:
        assert bad.file == str(manifest)
        for word in expected[bad.row]:
            assert word in bad.reason, (bad.row, word, bad.reason)
    by_row = {r.row: r for r in result.invalid}
    assert by_row["2"].path == "img/nope.png"
    assert by_row["12"].path == "../outside.png"
    if policy == "fail":
        with pytest.raises(InvalidRowsError) as info:
            apply_invalid_policy(result, "fail")
        message = str(info.value)
        assert f"{len(expected)} invalid rows" in message
        assert "data.on_invalid: quarantine" in message
        lines = message.splitlines()
        for bad in result.invalid:  # each on its own line
            assert f"  {manifest}:{bad.row}: {bad.path or '-'}: {bad.reason}" in lines
        assert info.value.invalid == result.invalid
    else:
        records, quarantine = apply_invalid_policy(result, "quarantine")
        assert [r.id for r in records] == ["a", "b"]
        assert len(records) + len(quarantine) == total  # nothing lost
        assert [q["row"] for q in quarantine] == list(expected)
        table = pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)
        assert table.num_rows == len(expected)
        rows, ids = table.column("row").to_pylist(), table.column("id").to_pylist()
        ids = dict(zip(rows, ids, strict=True))
        assert ids["2"] == "row-2"  # a row without an id: the id it would have had


def test_invalid_rows_in_csv_and_parquet(ds: Path) -> None:
    header = "id,image,caption,split\n"
    csv_path = ds / "bad.csv"
    csv_path.write_text(
        header + "a,img/a.png,good,train\n"  # 1
        ",img/nope.png,missing,\n"  # 2
        ",img/gray.png,  ,\n"  # 3
        "c,img/a_copy.png,copy,test\n"  # 4
        ",img/gray.png\n"  # 5: short row, no caption value
        ",../ds/img/gray.png,fine: resolves inside root,\n",  # 6
        encoding="utf-8",
    )
    result = load_manifest(csv_path, image_size=SIZE)
    assert [r.id for r in result.records] == ["a", "row-6"]
    reasons = {r.row: r.reason for r in result.invalid}
    assert list(reasons) == ["2", "3", "4", "5"]
    assert "not found" in reasons["2"]
    assert "caption is empty" in reasons["3"]
    assert "row 1" in reasons["4"] and "'train'" in reasons["4"]
    assert "caption is missing" in reasons["5"]

    rows = [
        {"id": "x", "image": "img/a.png", "caption": "good"},
        {"id": "y", "image": "img/b.jpg", "caption": None},
        {"id": "x", "image": "img/gray.png", "caption": "dup"},
    ]
    result = load_manifest(_write(ds / "bad.parquet", rows), image_size=SIZE)
    assert [r.id for r in result.records] == ["x"]
    assert [(r.row, r.path) for r in result.invalid] == [("2", "img/b.jpg"), ("3", "img/gray.png")]
    assert "caption is missing" in result.invalid[0].reason
    assert "duplicate id 'x' (first used in row 1)" in result.invalid[1].reason


def test_dataset_errors(ds: Path) -> None:
    no_caption = _write(ds / "m.csv", [{"image": "img/a.png", "text": "hi"}])
    with pytest.raises(DatasetError, match=r"m\.csv: missing required column 'caption'") as info:
        load_manifest(no_caption)
    assert "found columns: 'image', 'text'" in str(info.value)
    with pytest.raises(DatasetError, match="missing required column 'image'"):
        load_manifest(_write(ds / "m.jsonl", [{"caption": "hi"}]))
    (ds / "m.txt").write_text("image,caption\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"m\.txt: unknown manifest extension '\.txt'"):
        load_manifest(ds / "m.txt")
    (ds / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=r"broken\.parquet: cannot read"):
        load_manifest(ds / "broken.parquet")
    with pytest.raises(DatasetError, match="not found"):
        load_manifest(ds / "absent.csv")
    (ds / "empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match="empty"):
        load_manifest(ds / "empty.csv")
    (ds / "header_only.csv").write_text("image,caption\n", encoding="utf-8")
    assert load_manifest(ds / "header_only.csv") == ImportResult([], [])


def test_load_image_modes_resize_and_errors(ds: Path, tmp_path: Path) -> None:
    _bands(96, 48, 24, horizontal=True).save(tmp_path / "wide96.png")  # resized, then cropped
    image = load_image(tmp_path / "wide96.png", SIZE)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert (image[:, 3:-3] == GREEN).all()  # Lanczos leaves only faint ringing at the edges
    assert (np.abs(image.astype(int) - GREEN) <= 12).all()
    sixteen = np.full((40, 40), 128 * 257, dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "i16.png")
    assert (load_image(tmp_path / "i16.png", SIZE) == 128).all()
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([*BLUE, *RED] + [0] * 762)
    palette.paste(1, (0, 16, 32, 32))
    palette.save(tmp_path / "p.png", transparency=0)
    p = load_image(tmp_path / "p.png", SIZE)
    assert (p[:16] == WHITE).all() and (p[16:] == RED).all()
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert (load_image(tmp_path / "cmyk.jpg", 8) >= 250).all()
    with pytest.raises(ImageError, match="truncated"):
        load_image(ds / "img" / "truncated.png", SIZE)
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(ds / "img" / "garbage.png", SIZE)
    with pytest.raises(ImageError, match="not found"):
        load_image(ds / "img" / "absent.png", SIZE)


def _coco(ds: Path, images: list, annotations: list) -> Path:
    path = ds / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


def test_coco_groups_captions_and_reports_invalid_rows(ds: Path) -> None:
    images = [
        {"id": 1, "file_name": "img/a.png"},
        {"id": 2, "file_name": "img/b.jpg"},
        {"id": 3, "file_name": "img/gray.png"},  # no caption at all
        {"id": 4, "file_name": "img/nope.png"},  # missing file, one caption set aside
        {"id": 5, "file_name": "img/wide.png"},  # only an empty caption
        {"id": 1, "file_name": "img/tall.png"},  # duplicate image id
    ]
    annotations = [
        {"image_id": 1, "caption": "first"},
        {"image_id": 2, "caption": "b caption"},
        {"image_id": 99, "caption": "orphan"},
        {"image_id": 1, "caption": "second"},
        {"image_id": 4, "caption": "lost"},
        {"image_id": 5, "caption": "  "},
    ]
    path = _coco(ds, images, annotations)
    result = load_coco(path, ds, image_size=SIZE)
    assert [r.id for r in result.records] == ["coco-1", "coco-2"]
    first = result.records[0]
    assert first.captions == ("first", "second") and first.caption == "first"
    assert first.source == "coco" and first.source_path == "img/a.png" and first.split is None
    assert first.image.shape == (SIZE, SIZE, 3)
    reasons = {r.row: r.reason for r in result.invalid}
    assert list(reasons) == [
        "images[2]",
        "images[3]",
        "images[4]",
        "images[5]",
        "annotations[2]",
        "annotations[5]",
    ]
    assert "no valid caption" in reasons["images[2]"]
    assert "not found" in reasons["images[3]"] and "1 caption set aside" in reasons["images[3]"]
    assert "no valid caption" in reasons["images[4]"]
    assert "duplicate image id '1' (first used in images[0])" in reasons["images[5]"]
    assert "unknown image id 99" in reasons["annotations[2]"]
    assert "caption is empty" in reasons["annotations[5]"]
    with pytest.raises(InvalidRowsError, match=r"captions\.json:annotations\[2\]: -: refers"):
        apply_invalid_policy(result, "fail")
    records, quarantine = apply_invalid_policy(result, "quarantine")
    assert len(records) == 2 and len(quarantine) == 6
    ids = {q["row"]: q["id"] for q in quarantine}  # the corpus id each row is about
    assert ids["images[5]"] == "coco-1" and ids["annotations[2]"] == ""


def test_coco_dataset_errors(ds: Path) -> None:
    (ds / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.json: cannot read COCO JSON"):
        load_coco(ds / "bad.json", ds)
    (ds / "partial.json").write_text(json.dumps({"images": []}), encoding="utf-8")
    with pytest.raises(DatasetError, match="missing top-level key 'annotations'"):
        load_coco(ds / "partial.json", ds)
    with pytest.raises(DatasetError, match="not an existing folder"):
        load_coco(_coco(ds, [], []), ds / "nowhere")


def test_invalid_row_as_dict_matches_quarantine_schema() -> None:
    row = InvalidRow("m.csv", "3", "img/x.png", "caption is empty", "cat-3")
    assert list(row.as_dict()) == QUARANTINE_SCHEMA.names
    assert row.as_dict()["id"] == "cat-3"
    assert str(row) == "m.csv:3: img/x.png: caption is empty"


def test_captions_outside_the_gate_bounds_are_invalid_rows(ds: Path) -> None:
    """A caption validate would fail (here: longer than 20 or shorter than 3 characters) is an
    invalid row of the manifest or annotation, named with its length and the bound's param,
    so quarantine sets it aside instead of the gate failing the whole corpus."""
    rows = [
        {"id": "a", "image": "img/a.png", "caption": "x" * 21},
        {"id": "b", "image": "img/b.jpg", "caption": "ab"},
        {"id": "c", "image": "img/wide.png", "caption": "x" * 20},
    ]
    result = load_manifest(_write(ds / "m.jsonl", rows), image_size=SIZE, caption_chars=(3, 20))
    assert [r.id for r in result.records] == ["c"]
    reasons = {r.row: r.reason for r in result.invalid}
    assert reasons == {
        "1": "caption has 21 characters; validate.caption_max_chars is 20",
        "2": "caption has 2 characters; validate.caption_min_chars is 3",
    }
    images = [{"id": 1, "file_name": "img/a.png"}]
    annotations = [{"image_id": 1, "caption": "y" * 30}, {"image_id": 1, "caption": "fine"}]
    result = load_coco(_coco(ds, images, annotations), ds, SIZE, caption_chars=(3, 20))
    assert result.records[0].captions == ("fine",)
    assert [(r.row, r.reason) for r in result.invalid] == [
        ("annotations[0]", "caption has 30 characters; validate.caption_max_chars is 20")
    ]
