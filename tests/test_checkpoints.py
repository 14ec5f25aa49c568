"""Model folders (cm3leon/checkpoints.py): a damaged or mismatched folder is an error that names
the file, not a traceback from json, safetensors or torch."""

import json
from dataclasses import asdict, replace

import pytest

from cm3leon.checkpoints import load_model_folder, save_model_folder
from cm3leon.config import VQConfig
from cm3leon.tokenizers.vq import VQModel
from cm3leon.tokenizers.vq_training import load_vq, save_vq

TINY = VQConfig(codebook_size=8, code_dim=4, channels=(8, 16), num_res_blocks=1)


def test_a_config_that_is_not_json_names_the_file(tmp_path):
    save_vq(VQModel(TINY), tmp_path)
    (tmp_path / "config.json").write_text('{"config": {"codebook_size": 8,')  # torn write
    with pytest.raises(ValueError, match=r"config\.json: not a readable VQ tokenizer config"):
        load_vq(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: a VQ tokenizer config is a JSON object"):
        load_vq(tmp_path)


def test_an_edited_config_is_caught_by_its_fingerprint(tmp_path):
    save_vq(VQModel(TINY), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["codebook_size"] = 16
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="weights or config changed since they were saved"):
        load_model_folder(tmp_path, "VQ tokenizer")


def test_a_config_that_does_not_describe_its_weights_names_the_folder(tmp_path):
    """A consistent fingerprint over a config of another shape (a folder assembled by hand)."""
    state = VQModel(TINY).state_dict()
    other = replace(TINY, channels=(8, 32))
    save_model_folder(tmp_path, state, {"config": asdict(other)})
    with pytest.raises(ValueError) as caught:
        load_vq(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "the VQ tokenizer weights do not fit the model its config.json describes" in message
    assert "size mismatch" in message  # torch's own first lines, kept as the detail
