"""Mask binarization and IoU on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest

from cm3leon.data.masks import binarize_mask, mask_iou


def test_mask_iou() -> None:
    pred = np.zeros((4, 4), dtype=bool)
    target = np.zeros((4, 4), dtype=bool)
    pred[0:2, 0:2] = True  # 4 pixels
    target[1:3, 1:3] = True  # 4 pixels, overlap 1 -> IoU 1 / 7
    assert mask_iou(pred, target) == 1 / 7
    assert mask_iou(pred, pred) == 1.0
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    assert mask_iou(pred, np.zeros((4, 4), bool)) == 0.0
    with pytest.raises(ValueError):
        mask_iou(pred, np.zeros((4, 5), bool))


def test_binarize_mask() -> None:
    rgb = np.array([[[255, 255, 255], [0, 0, 0]], [[200, 100, 90], [128, 128, 128]]], np.uint8)
    # Channel means: 255, 0, 130, 128 -> all but the black pixel exceed 127.
    assert binarize_mask(rgb).tolist() == [[True, False], [True, True]]
    gray = np.array([[127, 128]], np.uint8)
    assert binarize_mask(gray).tolist() == [[False, True]]
    with pytest.raises(ValueError):
        binarize_mask(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError):
        binarize_mask(np.zeros((2, 2), np.float32))
