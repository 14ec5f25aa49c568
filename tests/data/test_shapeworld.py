"""ShapeWorld generator determinism, captions and parser agreement (clean and degraded)."""

import dataclasses
import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from cm3leon.config import ConfigError, ShapeWorldConfig
from cm3leon.data.shapeworld import (
    CAPTION_TEMPLATES,
    ShapeObject,
    caption_scene,
    describe_object,
    generate_scenes,
    object_alpha,
    render_scene,
    render_scenes,
    scene_from_json,
    scene_to_json,
)
from cm3leon.data.shapeworld_parser import (
    ShapeWorldParser,
    agreement_summary,
    compare_scene,
    parse_caption,
    same_objects,
    truth_objects,
)

CONFIG = ShapeWorldConfig(num_images=1200, min_objects=1, max_objects=3)


@pytest.fixture(scope="module")
def scenes_and_images():
    scenes = generate_scenes(CONFIG, seed=11)
    return scenes, render_scenes(scenes, 32, CONFIG.grid_size)


@pytest.fixture(scope="module")
def parser():
    return ShapeWorldParser.from_config(CONFIG, 32)


def agreement(parser, scenes, images):
    return agreement_summary(
        [
            compare_scene(truth_objects(s), parser.parse(im))
            for s, im in zip(scenes, images, strict=True)
        ]
    )


def test_generation_is_deterministic_in_the_seed():
    a = generate_scenes(CONFIG, seed=3)[:50]
    b = generate_scenes(CONFIG, seed=3)[:50]
    c = generate_scenes(CONFIG, seed=4)[:50]
    assert a == b
    assert a != c
    assert np.array_equal(render_scenes(a, 32, 3), render_scenes(b, 32, 3))


def test_scenes_respect_the_config(scenes_and_images):
    scenes, images = scenes_and_images
    assert images.shape == (1200, 32, 32, 3) and images.dtype == np.uint8
    counts = {len(s) for s in scenes}
    assert counts == {1, 2, 3}
    for scene in scenes:
        cells = [(o.row, o.col) for o in scene]
        assert len(set(cells)) == len(cells)
        assert cells == sorted(cells)
        for o in scene:
            assert o.shape in CONFIG.shapes and o.color in CONFIG.colors and o.size in CONFIG.sizes
            assert abs(o.dx) <= CONFIG.position_jitter and abs(o.dy) <= CONFIG.position_jitter


def test_object_weights_set_the_share_of_each_object_count():
    weighted = dataclasses.replace(CONFIG, num_images=3000, object_weights=(1.0, 0.0, 3.0))
    counts = np.bincount([len(s) for s in generate_scenes(weighted, seed=5)], minlength=4)
    assert counts[2] == 0  # weight 0: never drawn
    assert counts[3] / counts[1:].sum() == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ConfigError, match="object_weights: needs one weight per object count"):
        dataclasses.replace(CONFIG, object_weights=(1.0, 1.0))
    with pytest.raises(ConfigError, match="object_weights: weights must be >= 0"):
        dataclasses.replace(CONFIG, object_weights=(1.0, -1.0, 1.0))


def test_render_draws_the_exact_palette_color_at_an_object_center():
    obj = ShapeObject("square", "blue", "large", row=1, col=1)
    image = render_scene((obj,), 32, 3)
    assert tuple(image[16, 16]) == (40, 80, 230)
    assert tuple(image[0, 0]) == (0, 0, 0)
    alpha = object_alpha(obj, 32, 3)
    # A 0.85 * 32/3 = 9.07 px square covers about 82 pixels.
    assert alpha.sum() == pytest.approx((0.85 * 32 / 3) ** 2, rel=0.02)


def test_captions_have_several_paraphrases_naming_every_object():
    scene = (
        ShapeObject("circle", "red", "large", 0, 0),
        ShapeObject("triangle", "cyan", "small", 1, 1),
    )
    captions = caption_scene(scene, 3)
    assert len(captions) == len(CAPTION_TEMPLATES) >= 3
    assert len(set(captions)) == len(captions)
    assert (
        captions[0] == "a large red circle at the top left and a small cyan triangle at the center"
    )
    for caption in captions:
        assert "large red circle" in caption and "small cyan triangle" in caption


def test_describe_object_is_the_shortest_unique_phrase():
    a = ShapeObject("circle", "red", "large", 0, 0)
    b = ShapeObject("circle", "blue", "large", 0, 1)
    c = ShapeObject("square", "blue", "small", 2, 2)
    assert describe_object(c, (a, b, c), 3) == "square"
    assert describe_object(a, (a, b, c), 3) == "red circle"
    twin = ShapeObject("circle", "red", "large", 2, 0)
    assert describe_object(a, (a, twin), 3) == "large red circle at the top left"


def test_scene_json_round_trip():
    scene = generate_scenes(CONFIG, seed=5)[0]
    assert scene_from_json(scene_to_json(scene)) == scene
    assert isinstance(json.loads(scene_to_json(scene)), list)


def test_parser_agrees_with_ground_truth_on_clean_renders(parser, scenes_and_images):
    scenes, images = scenes_and_images
    summary = agreement(parser, scenes, images)
    assert summary["attribute_agreement"] >= 0.99
    assert summary["exact_scene_rate"] >= 0.99


def shift(image, dy, dx):
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


@pytest.mark.parametrize("degradation", ["blur", "color_shift", "jitter", "noise"])
def test_parser_stays_right_on_degraded_renders(parser, scenes_and_images, degradation):
    scenes, images = scenes_and_images
    scenes, images = scenes[:400], images[:400]
    rng = np.random.default_rng(0)
    if degradation == "blur":
        out = [gaussian_filter(im.astype(float), sigma=(0.7, 0.7, 0)) for im in images]
    elif degradation == "color_shift":
        out = [im.astype(float) + rng.integers(-20, 21, size=3) for im in images]
    elif degradation == "jitter":
        out = [shift(im, *rng.integers(-1, 2, size=2)).astype(float) for im in images]
    else:
        out = [im + rng.normal(0, 8, size=im.shape) for im in images]
    degraded = np.clip(np.rint(np.stack(out)), 0, 255).astype(np.uint8)
    assert agreement(parser, scenes, degraded)["attribute_agreement"] >= 0.97


def test_parser_reports_wrong_and_missing_objects():
    truth = (
        ShapeObject("circle", "red", "large", 0, 0),
        ShapeObject("square", "blue", "small", 2, 2),
    )
    wrong = (
        ShapeObject("circle", "green", "large", 0, 0),
        ShapeObject("square", "blue", "small", 1, 1),
    )
    parser = ShapeWorldParser.from_config(CONFIG, 32)
    result = compare_scene(truth_objects(truth), parser.parse(render_scene(wrong, 32, 3)))
    assert not result.exact
    # circle: position, shape, size right, color wrong; square: missing (4 wrong); spurious: 4 wrong
    assert (result.attributes_correct, result.attributes_total) == (3, 12)
    assert result.per_attribute["color"] == (0, 3)


def test_parser_rejects_a_wrong_image_size():
    parser = ShapeWorldParser.from_config(CONFIG, 32)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        parser.parse(np.zeros((16, 16, 3), dtype=np.uint8))


def test_empty_image_parses_to_nothing():
    parser = ShapeWorldParser.from_config(CONFIG, 32)
    assert parser.parse(np.zeros((32, 32, 3), dtype=np.uint8)) == []


def test_caption_parser_reads_every_template_and_judges_exactly():
    config = ShapeWorldConfig()
    scene = (
        ShapeObject("square", "red", "small", 0, 0, dx=1),
        ShapeObject("triangle", "cyan", "large", 1, 2),
    )
    truth = truth_objects(scene)
    args = (config.grid_size, config.shapes, config.colors, config.sizes)
    for caption in caption_scene(scene, config.grid_size):
        assert same_objects(truth, parse_caption(caption, *args)), caption
    assert same_objects(
        truth, parse_caption("TOP LEFT: small red square, right: large cyan triangle", *args)
    )
    wrong = "a small red square at the top left and a large cyan circle at the right"
    assert not same_objects(truth, parse_caption(wrong, *args))
    missing = "a small red square at the top left"
    assert not same_objects(truth, parse_caption(missing, *args))
    no_position = parse_caption("a small red square", *args)
    assert [(o.row, o.col) for o in no_position] == [(-1, -1)]
    assert parse_caption("nothing to see", *args) == []
