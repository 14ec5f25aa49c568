"""The task-mixing sampler of multi-task SFT."""

import pytest

from cm3leon.sft.mixing import mixture


def test_mixing_proportions_follow_the_weights():
    mix = mixture(
        {"vqa": 1000, "captioning": 10, "editing": 0}, {"vqa": 1, "captioning": 3, "editing": 5}
    )
    assert mix.probabilities() == {"captioning": 0.75, "vqa": 0.25}  # editing has no examples
    draws = [mix.sample(n, seed=0) for n in range(4000)]
    share = sum(t == "captioning" for t, _ in draws) / len(draws)
    assert share == pytest.approx(0.75, abs=0.03)  # captioning up-sampled 100x over its size
    assert all(0 <= i < 10 for t, i in draws if t == "captioning")
    assert draws == [mix.sample(n, seed=0) for n in range(4000)]
    with pytest.raises(ValueError, match="unknown tasks"):
        mixture({"vqa": 1}, {"poetry": 1.0})
    with pytest.raises(ValueError, match="no task has"):
        mixture({"vqa": 0}, {"vqa": 1.0})
