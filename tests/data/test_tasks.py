"""Task tables: answers and targets agree with the scene they were derived from."""

import numpy as np
import pytest

from cm3leon.config import ShapeWorldConfig
from cm3leon.data.shapeworld import (
    COLORS,
    ShapeObject,
    generate_scenes,
    position_name,
    render_scene,
    scene_from_json,
)
from cm3leon.data.shapeworld_parser import ShapeWorldParser, compare_scene, truth_objects
from cm3leon.data.tasks import EDIT_TYPES, QUESTION_TYPES, build_task_tables

CONFIG = ShapeWorldConfig(num_images=300, vqa_per_image=3, edits_per_image=2)


@pytest.fixture(scope="module")
def tables():
    scenes = generate_scenes(CONFIG, seed=2)
    ids = [f"sw-{i:06d}" for i in range(len(scenes))]
    return dict(zip(ids, scenes, strict=True)), build_task_tables(ids, scenes, CONFIG, 32, seed=2)


def test_tables_are_deterministic(tables):
    scenes_by_id, first = tables
    again = build_task_tables(list(scenes_by_id), list(scenes_by_id.values()), CONFIG, 32, seed=2)
    assert again == first


def test_vqa_answers_are_true_of_the_scene(tables):
    scenes_by_id, t = tables
    rows = t["vqa"]
    assert {r["question_type"] for r in rows} == set(QUESTION_TYPES)
    for row in rows:
        scene = scenes_by_id[row["image_id"]]
        kind, q, a = row["question_type"], row["question"], row["answer"]
        if kind == "count":
            assert a == str(len(scene))
        elif kind == "color":
            assert any(o.color == a and o.shape in q for o in scene)
        elif kind == "shape":
            assert any(o.shape == a and position_name(o.row, o.col, 3) in q for o in scene)
        elif kind == "position":
            assert any(position_name(o.row, o.col, 3) == a and o.shape in q for o in scene)
        else:
            color, shape = q.removeprefix("is there a ").removesuffix("?").split()
            expected = any(o.color == color and o.shape == shape for o in scene)
            assert a == ("yes" if expected else "no")
    per_image = {}
    for row in rows:
        per_image.setdefault(row["image_id"], set()).add(row["question"])
    assert all(len(qs) <= 3 for qs in per_image.values())


def test_edit_targets_differ_from_the_source_by_exactly_the_edit(tables):
    scenes_by_id, t = tables
    parser = ShapeWorldParser.from_config(CONFIG, 32)
    assert {r["edit_type"] for r in t["edits"]} == set(EDIT_TYPES)
    for row in t["edits"][:200]:
        source = scenes_by_id[row["image_id"]]
        target = scene_from_json(row["target_objects"])
        changed = set(source) ^ set(target)
        assert len(changed) == 2, row["instruction"]  # one object out, its edited self in
        image = np.frombuffer(row["target_image"], dtype=np.uint8).reshape(32, 32, 3)
        assert compare_scene(truth_objects(target), parser.parse(image)).exact


def test_segmentation_masks_cover_the_named_object(tables):
    scenes_by_id, t = tables
    for row in t["segmentation"][:100]:
        (obj,) = scene_from_json(row["target_object"])
        assert obj in scenes_by_id[row["image_id"]]
        mask = np.frombuffer(row["mask"], dtype=np.uint8).reshape(32, 32)
        assert set(np.unique(mask)) <= {0, 255}
        image = render_scene((obj,), 32, 3).astype(float)
        coverage = image.max(axis=2) / max(COLORS[obj.color])  # the render's anti-aliased alpha
        lit, masked = coverage >= 0.5, mask > 0
        # the mask is exactly the object's half-covered pixels, up to the render's rounding
        assert masked.sum() > 0 and (lit & masked).sum() / (lit | masked).sum() > 0.95


def test_grounding_boxes_enclose_each_object():
    scene = (
        ShapeObject("square", "red", "large", 0, 0),
        ShapeObject("circle", "blue", "small", 2, 2),
    )
    t = build_task_tables(["a"], [scene], CONFIG, 32, seed=0)
    prompt = t["grounding"][0]["prompt"]
    assert prompt.startswith("a red square in box (")
    assert " and a blue circle in box (" in prompt
    # large square centered at (5.33, 5.33) with side 9.07 -> pixels 1..9
    assert "a red square in box (1, 1, 10, 10)" in prompt
