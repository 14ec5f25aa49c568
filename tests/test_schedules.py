"""The shared warmup + cosine schedule on hand-computed values."""

from __future__ import annotations

import math

import pytest

from cm3leon.config import TrainConfig
from cm3leon.schedules import warmup_cosine
from cm3leon.training.loop import lr_factor


def test_warmup_is_linear_from_the_first_step() -> None:
    # 100 steps, 10 of warmup: step 0 already trains at 1/10, step 9 reaches the peak.
    assert warmup_cosine(0, 100, 10) == 0.1
    assert warmup_cosine(4, 100, 10) == 0.5
    assert warmup_cosine(9, 100, 10) == 1.0
    assert warmup_cosine(0, 100, 10, peak=2.0) == 0.2


def test_cosine_decays_to_min_ratio_and_stays_there() -> None:
    # Decay spans steps 10..100: step 10 is progress 0, step 55 is halfway, step 100 the end.
    assert warmup_cosine(10, 100, 10) == 1.0
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5, abs=1e-15)
    assert warmup_cosine(100, 100, 10) == 0.0
    # min_ratio 0.1: halfway is 0.1 + 0.9 * 0.5, the end is 0.1, and past the end stays 0.1.
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.55, abs=1e-15)
    assert warmup_cosine(100, 100, 10, 0.1) == 0.1
    assert warmup_cosine(250, 100, 10, 0.1) == 0.1
    # A quarter of the way through a 100-step decay: (1 + cos(pi / 4)) / 2 = (2 + sqrt 2) / 4.
    assert warmup_cosine(35, 110, 10) == pytest.approx((2 + math.sqrt(2)) / 4, abs=1e-15)
    assert warmup_cosine(55, 100, 10, peak=0.002) == pytest.approx(0.001, abs=1e-18)


def test_no_warmup_and_degenerate_lengths() -> None:
    assert warmup_cosine(0, 100, 0) == 1.0  # progress 0 at the first step
    assert warmup_cosine(0, 1, 0, 0.1) == 1.0
    assert warmup_cosine(1, 1, 0, 0.1) == 0.1  # total == warmup: no division by zero
    assert warmup_cosine(5, 5, 5) == 1.0  # all warmup: the step after it starts at the peak
    assert warmup_cosine(6, 5, 5) == 0.0


def test_peak_matches_the_loops_own_formula_bit_for_bit() -> None:
    # The VQ and retriever loops' formula before they shared this one, operation for operation:
    # the artifact hashes depend on these exact floats.
    lr, steps, warmup = 0.002, 1500, 50
    for step in range(steps):
        if step < warmup:
            expected = lr * (step + 1) / warmup
        else:
            progress = (step - warmup) / (steps - warmup)
            expected = lr * 0.5 * (1 + math.cos(math.pi * progress))
        assert warmup_cosine(step, steps, warmup, peak=lr) == expected, step


def test_lr_factor_reads_the_train_config() -> None:
    config = TrainConfig(steps=100, lr=0.003, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(9, config) == 1.0
    assert lr_factor(100, config) == 0.1
    assert lr_factor(55, config) == warmup_cosine(55, 100, 10, 0.1)
