"""The scene judge is built from the corpus manifest, not from params, and only for ShapeWorld."""

import json

import pytest

from cm3leon.config import DataConfig, ShapeWorldConfig
from cm3leon.data.corpus import CorpusError, decode_images, read_documents
from cm3leon.data.prepare import prepare_corpus
from cm3leon.data.scene_judge import load_judge
from cm3leon.data.shapeworld_parser import ShapeWorldParser, compare_scene

# A non-default palette and grid: the judge must read them from the manifest.
SHAPEWORLD = ShapeWorldConfig(
    num_images=40, grid_size=2, colors=("red", "blue", "yellow"), shapes=("square", "circle")
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge") / "corpus"
    prepare_corpus(DataConfig(shapeworld=SHAPEWORLD, shard_size=16), 5, root)
    return root


def test_the_judge_of_a_shapeworld_corpus_reads_its_renders_as_the_params_parser_does(corpus):
    entry = json.loads((corpus / "manifest.json").read_text())["judge"]
    assert entry["grid_size"] == 2 and entry["colors"] == ["red", "blue", "yellow"]
    judge = load_judge(corpus)
    reference = ShapeWorldParser.from_config(SHAPEWORLD, 32)
    table = read_documents(corpus, ["id", "image", "height", "width", "objects"])
    images = decode_images(table)
    exact = 0
    for objects, image in zip(table.column("objects").to_pylist(), images, strict=True):
        truth = judge.truth(objects)
        assert judge.parse(image) == reference.parse(image)
        exact += judge.compare(truth, image).exact
        assert compare_scene(truth, judge.parse(image)) == judge.compare(truth, image)
    assert exact >= 0.99 * len(images)
    assert judge.parse_caption("a large blue circle at the top left")[0].color == "blue"


def test_a_corpus_without_a_judge_entry_has_none_and_a_broken_one_is_named(corpus, tmp_path):
    manifest = json.loads((corpus / "manifest.json").read_text())
    folder = tmp_path / "user"
    folder.mkdir()
    del manifest["judge"]  # what prepare writes for user data
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert load_judge(folder) is None
    broken = json.loads((corpus / "manifest.json").read_text())
    del broken["judge"]["colors"]
    (folder / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(CorpusError, match=r"manifest.json: judge entry lacks \['colors'\]"):
        load_judge(folder)
    broken["judge"] = {"kind": "coco-boxes"}
    (folder / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(CorpusError, match="unknown judge kind 'coco-boxes'"):
        load_judge(folder)
