"""The prepare library call: ShapeWorld corpus end to end, byte-identical for the same seed."""

from dataclasses import replace

import numpy as np
import pytest

from cm3leon.artifacts import folder_digest
from cm3leon.config import CocoConfig, DataConfig, ManifestConfig, ShapeWorldConfig
from cm3leon.data.corpus import (
    decode_images,
    iter_documents,
    read_documents,
    read_manifest,
    read_task_table,
)
from cm3leon.data.prepare import prepare_corpus
from cm3leon.data.shapeworld import render_scene, scene_from_json
from cm3leon.tasks import TABLE_TASKS

CONFIG = DataConfig(shard_size=64, shapeworld=ShapeWorldConfig(num_images=200))


def test_same_seed_gives_byte_identical_corpus(tmp_path):
    prepare_corpus(CONFIG, 5, tmp_path / "a")
    prepare_corpus(CONFIG, 5, tmp_path / "b")
    prepare_corpus(CONFIG, 6, tmp_path / "c")
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    assert folder_digest(tmp_path / "a") != folder_digest(tmp_path / "c")


def test_corpus_contents(tmp_path):
    manifest = prepare_corpus(CONFIG, 5, tmp_path / "corpus")
    assert manifest == read_manifest(tmp_path / "corpus")
    assert manifest["num_documents"] == 200
    assert len(manifest["shards"]) == 4  # 200 documents, 64 per shard
    table = read_documents(tmp_path / "corpus")
    assert table.num_rows == 200
    assert sum(manifest["splits"].values()) == 200
    # identical images never straddle splits
    pairs = set(
        zip(
            table.column("image_sha256").to_pylist(),
            table.column("split").to_pylist(),
            strict=True,
        )
    )
    assert len({h for h, _ in pairs}) == len(pairs)
    # images decode to the rendered scene, captions are among the paraphrases
    images = decode_images(table)
    for i in range(0, 200, 37):
        scene = scene_from_json(table.column("objects")[i].as_py())
        assert np.array_equal(images[i], render_scene(scene, 32, 3))
        assert table.column("caption")[i].as_py() in table.column("captions")[i].as_py()
    ids = set(table.column("id").to_pylist())
    for name in TABLE_TASKS:
        rows = read_task_table(tmp_path / "corpus", name)
        assert rows.num_rows > 0
        assert set(rows.column("image_id").to_pylist()) <= ids


def test_streaming_reads_one_split(tmp_path):
    prepare_corpus(CONFIG, 5, tmp_path / "corpus")
    batches = list(iter_documents(tmp_path / "corpus", ["id", "caption"], split="val"))
    assert all(b.schema.names == ["id", "caption"] for b in batches)
    assert sum(b.num_rows for b in batches) == read_manifest(tmp_path / "corpus")["splits"]["val"]


def test_user_data_with_no_valid_row_names_every_reason(tmp_path):
    """Under quarantine too: with nothing left to write, the error lists each row's reason
    (nothing is set aside silently)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption\nmissing.png,a cat\nother.png,\n", encoding="utf-8")
    for policy in ("quarantine", "fail"):
        config = DataConfig(
            source="manifest", on_invalid=policy, manifest=ManifestConfig(path=str(manifest))
        )
        with pytest.raises(ValueError, match="no valid documents to write") as err:
            prepare_corpus(config, 1, tmp_path / "corpus")
        text = str(err.value)
        assert "(2 invalid rows)" in text
        assert "m.csv:1: missing.png: image file not found" in text
        assert "m.csv:2: other.png: caption is empty" in text
        assert not (tmp_path / "corpus").exists()


def test_user_data_outside_the_tracked_folder_is_refused(tmp_path):
    """dvc.yaml tracks data/raw as prepare's input: data elsewhere could change unseen."""
    raw = tmp_path / "raw"
    (raw / "img").mkdir(parents=True)
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("image,caption\nimg/a.png,a cat\n", encoding="utf-8")
    config = DataConfig(source="manifest", manifest=ManifestConfig(path=str(outside)))
    with pytest.raises(ValueError, match=r"data\.manifest\.path: .*elsewhere\.csv is outside"):
        prepare_corpus(config, 1, tmp_path / "corpus", tracked=raw)
    sneaky = ManifestConfig(path=str(raw / ".." / "elsewhere.csv"))  # '..' counts as outside
    with pytest.raises(ValueError, match="is outside"):
        prepare_corpus(replace(config, manifest=sneaky), 1, tmp_path / "corpus", tracked=raw)
    inside = ManifestConfig(path=str(raw / "m.csv"), root=str(tmp_path))  # a root outside too
    with pytest.raises(ValueError, match=r"data\.manifest\.root: .* is outside"):
        prepare_corpus(replace(config, manifest=inside), 1, tmp_path / "corpus", tracked=raw)
    coco = DataConfig(source="coco", coco=CocoConfig(annotations=str(outside), images=str(raw)))
    with pytest.raises(ValueError, match=r"data\.coco\.annotations"):
        prepare_corpus(coco, 1, tmp_path / "corpus", tracked=raw)
    assert not (tmp_path / "corpus").exists()
