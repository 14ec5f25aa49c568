"""Config strictness: every params.yaml section loads; unknown keys and bad values name the key."""

from pathlib import Path

import pytest

from cm3leon.config import ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_project_params_load_every_section():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "shapeworld"
    assert params.data.shapeworld.shapes == ("square", "circle", "triangle")
    assert abs(sum(params.data.splits.as_dict().values()) - 1) < 1e-9


def test_missing_sections_take_defaults(tmp_path):
    assert load_params(write(tmp_path, "base:\n  seed: 7\n")) == Params(
        base=Params().base.__class__(seed=7)
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("dta:\n  source: shapeworld\n", "'dta'"),
        ("data:\n  sours: shapeworld\n", "'data.sours'"),
        ("data:\n  shapeworld:\n    num_imgs: 3\n", "'data.shapeworld.num_imgs'"),
        ("validate:\n  caption_max: 3\n", "'validate.caption_max'"),
    ],
)
def test_unknown_key_is_named_with_valid_keys(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, text))
    message = str(err.value)
    assert key in message
    assert "valid keys" in message


def test_valid_keys_are_listed(tmp_path):
    with pytest.raises(ConfigError, match="num_images"):
        load_params(write(tmp_path, "data:\n  shapeworld:\n    num_imgs: 3\n"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("base:\n  seed: ten\n", "base.seed: expected an integer"),
        ("data:\n  source: flickr\n", "data.source: 'flickr' is not one of"),
        ("data:\n  on_invalid: skip\n", "data.on_invalid"),
        ("data:\n  shapeworld:\n    colors: [red, mauve]\n", "data.shapeworld.colors: unknown"),
        ("data:\n  shapeworld:\n    min_objects: 3\n    max_objects: 2\n", "max_objects"),
        ("data:\n  splits:\n    train: 0.5\n    val: 0.1\n    test: 0.1\n", "sum to 1"),
        ("data:\n  source: manifest\n", "data.manifest.path: is required"),
        ("validate:\n  check_split_proportions: 1\n", "expected true or false"),
        ("data: [1, 2]\n", "data: expected a mapping"),
        # TrainConfig serves two sections: the error names the one it was read from
        ("sft:\n  train:\n    steps: 0\n", "sft.train.steps: must be >= 1"),
        ("pretrain:\n  train:\n    lr: 0\n", "pretrain.train.lr: must be > 0"),
        ("sft:\n  mixing:\n    poetry: 1.0\n", "sft.mixing.poetry: unknown task; known: ["),
        ("sft:\n  mixing:\n    vqa: -1\n", "sft.mixing.vqa: must be >= 0"),
        ("sft:\n  mixing: [vqa]\n", "sft.mixing: expected a mapping"),
        ("evaluate:\n  decoding:\n    strategy: beam\n", "evaluate.decoding.strategy: must be"),
        ("evaluate:\n  decoding:\n    caption_samples: 0\n", "caption_samples: must be >= 1"),
        ("evaluate:\n  decoding:\n    caption_top_p: 0\n", "caption_top_p: must be in (0, 1]"),
        (
            "evaluate:\n  decoding:\n    rerank_caption_weight: -1\n",
            "rerank_caption_weight: must be >= 0",
        ),
        (
            "evaluate:\n  decoding:\n    answer_cfg_weight: -0.5\n",
            "evaluate.decoding.answer_cfg_weight: must be >= 0",
        ),
    ],
)
def test_bad_values_are_rejected_with_their_key(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, text))
    assert fragment in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "data: [unclosed\n"))


def test_mixing_is_a_mapping_over_the_task_registry(tmp_path):
    from cm3leon.tasks import TASKS

    params = load_params(write(tmp_path, "sft:\n  mixing:\n    vqa: 2\n"))
    assert list(params.sft.mixing) == list(TASKS)  # every task, in the registry's order
    assert params.sft.mixing["vqa"] == 2.0 and params.sft.mixing["editing"] == 1.0
