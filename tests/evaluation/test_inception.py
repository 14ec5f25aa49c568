"""Inception FID is opt-in: clear errors without torchvision or weights; features when present."""

import importlib.util

import numpy as np
import pytest
import torch

from cm3leon.evaluation.inception import inception_features, load_inception

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the message shown without torchvision")
def test_without_torchvision_the_error_says_what_to_install(tmp_path):
    with pytest.raises(RuntimeError, match=r"\.\[inception\]"):
        load_inception(tmp_path / "weights.pt")


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed (extra: inception)")
def test_local_weights_give_2048_features(tmp_path):
    from torchvision.models import inception_v3

    path = tmp_path / "weights.pt"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_inception(tmp_path / "missing.pt")
    model = load_inception(path)
    features = inception_features(model, np.zeros((2, 32, 32, 3), np.uint8))
    assert features.shape == (2, 2048) and np.isfinite(features).all()
