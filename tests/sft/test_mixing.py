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


def test_length_groups_keep_each_tasks_share_and_one_group_per_step():
    sizes = {"text_to_image": 100, "vqa": 100, "editing": 100, "segmentation": 100}
    weights = {"text_to_image": 1, "vqa": 1, "editing": 2, "segmentation": 0}
    groups = {"text_to_image": 1, "vqa": 1, "editing": 2, "segmentation": 2}
    mix = mixture(sizes, weights, groups)
    per_step, counts = 8, {t: 0 for t in sizes}
    for step in range(1500):
        group = mix.group_of(step, seed=4)
        picks = [mix.sample(n, 4, group) for n in range(step * per_step, (step + 1) * per_step)]
        assert {groups[t] for t, _ in picks} == {group}  # one length group per step
        for t, _ in picks:
            counts[t] += 1
    total = sum(counts.values())
    # The grouped draw keeps the ungrouped marginal: 1/4, 1/4, 1/2, 0.
    assert counts["text_to_image"] / total == pytest.approx(0.25, abs=0.03)
    assert counts["vqa"] / total == pytest.approx(0.25, abs=0.03)
    assert counts["editing"] / total == pytest.approx(0.5, abs=0.04)
    assert counts["segmentation"] == 0
    assert mixture(sizes, weights).group_of(3, seed=4) is None  # no groups: per-sample mixing
    with pytest.raises(ValueError, match="length groups"):
        mixture(sizes, weights, {"vqa": 1})
