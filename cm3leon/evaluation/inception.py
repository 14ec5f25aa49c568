"""Inception-v3 features for the standard FID (Heusel et al. 2017), from local weights only.

FID's usual feature space is the 2048-d pool layer of Inception-v3. Nothing here downloads:
``evaluate.inception_weights`` must point to a local torchvision ``inception_v3`` state dict
(e.g. saved once with ``torch.save(inception_v3(weights="DEFAULT").state_dict(), path)`` on a
machine with network). torchvision is an optional dependency (``pip install -e ".[inception]"``).
Images are resized to 299x299 (bilinear) and normalized with ImageNet statistics, as torchvision's
weights expect. Without weights configured, the evaluate stage reports FID in the dual encoder's
feature space only, named ``fid_dual_encoder``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_inception(weights: str | Path) -> torch.nn.Module:
    """Inception-v3 up to its pool layer, with the given local weights."""
    try:
        from torchvision.models import inception_v3
    except ImportError:
        raise RuntimeError(
            "evaluate.inception_weights is set but torchvision is not installed; "
            'install it (pip install -e ".[inception]") or set inception_weights: null'
        ) from None
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"evaluate.inception_weights: {path} does not exist")
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()  # keep the 2048-d pooled features
    return model.eval()


@torch.no_grad()
def inception_features(
    model: torch.nn.Module, images: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 -> ``(N, 2048)`` float64 pool features."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(model((x - mean) / std).double())
    return torch.cat(out).numpy()
