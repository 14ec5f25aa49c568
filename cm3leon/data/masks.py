"""Binary segmentation masks: binarizing rendered mask images and intersection over union.

Masks are stored as ``(H, W)`` uint8 arrays of 0 or 255
(:func:`cm3leon.data.shapeworld.object_mask`) and come back from the image tokenizer as
``(H, W, 3)`` uint8 images; a pixel counts as inside when its mean channel value exceeds 127.
Both the VQ tokenizer's mask round trip (:mod:`cm3leon.tokenizers.vq_training`) and the
segmentation task's score (:mod:`cm3leon.evaluation.metrics`) use these, so they live in the
data layer, which both may import.
"""

from __future__ import annotations

import numpy as np


def mask_iou(predicted: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two boolean masks of one shape (1.0 when both are empty)."""
    p = np.asarray(predicted).astype(bool)
    t = np.asarray(target).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    union = np.logical_or(p, t).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, t).sum() / union)


def binarize_mask(image: np.ndarray) -> np.ndarray:
    """Turn an (H, W, 3) or (H, W) uint8 image into a bool mask: mean channel value > 127."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise ValueError(f"binarize_mask expects a uint8 image, got dtype {x.dtype}")
    if x.ndim == 2:
        return x > 127
    if x.ndim == 3 and x.shape[2] == 3:
        return x.mean(axis=2) > 127
    raise ValueError(f"binarize_mask expects shape (H, W) or (H, W, 3), got {x.shape}")
