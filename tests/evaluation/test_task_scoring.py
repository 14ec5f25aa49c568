"""Evaluation plumbing: strategy plans and the study helpers' re-ranking prefix."""

from cm3leon.config import DecodingConfig
from cm3leon.evaluation.tasks import answer_strategy, strategies, task_plan
from cm3leon.inference.multimodal import Generation, rerank_prefix
from cm3leon.tasks import TASKS


def test_mix_alternates_top_p_and_cd_k_with_shared_settings():
    config = DecodingConfig(cfg_weight=2.0, cd_alpha=0.3, cd_k=4, top_p=0.8)
    plan = strategies(config, "mix", 5, cfg_weight=3.0)
    assert [s.name for s in plan] == ["top_p", "cd_k", "top_p", "cd_k", "top_p"]
    assert {s.settings.cfg_weight for s in plan} == {
        3.0
    }  # the study's weight, not the headline one
    assert {(s.settings.cd_alpha, s.settings.cd_k, s.settings.top_p) for s in plan} == {
        (0.3, 4, 0.8)
    }
    assert [s.name for s in strategies(config, "cd_k", 2, 1.0)] == ["cd_k", "cd_k"]
    (answer,) = answer_strategy(config)
    assert answer.name == "greedy" and not answer.needs_unconditional


def test_each_task_is_decoded_by_its_plan():
    config = DecodingConfig(
        strategy="mix", samples=6, cfg_weight=2.0, answer_cfg_weight=1.5, caption_samples=3
    )
    # text-to-image: the headline's re-ranked samples at the headline weight
    t2i = task_plan(config, TASKS["text_to_image"])
    assert [s.name for s in t2i] == ["top_p", "cd_k"] * 3
    assert {s.settings.cfg_weight for s in t2i} == {2.0}
    # captioning: the answer caption first, then top-p ones, all unguided
    captions = task_plan(config, TASKS["captioning"])
    assert [s.name for s in captions] == ["greedy", "top_p", "top_p"]
    assert not any(s.needs_unconditional for s in captions)
    # an image from a prompt with text (SFT trains its unconditional stream): one guided
    # answer, grounding included (its boxes are no caption the re-rankers read)
    for name in ("editing", "grounding", "segmentation"):
        assert TASKS[name].guidable and not TASKS[name].reranked
        (answer,) = task_plan(config, TASKS[name])
        assert answer.name == "greedy" and answer.settings.cfg_weight == 1.5
        assert answer.needs_unconditional
    # a text answer is never guided (no trained unconditional stream)
    (vqa,) = task_plan(config, TASKS["vqa"])
    assert vqa.name == "greedy" and not vqa.needs_unconditional
    assert TASKS["text_to_image"].reranked and not TASKS["vqa"].reranked
    # weight 1 is plain decoding
    (plain,) = task_plan(DecodingConfig(answer_cfg_weight=1.0), TASKS["editing"])
    assert not plain.needs_unconditional


def test_rerank_prefix_picks_the_best_among_the_first_n():
    generation = Generation("text_to_image", [[]] * 4, ["top_p"] * 4, 3, [0.1, 0.5, 0.2, 0.9], [])
    assert [rerank_prefix(generation, n) for n in (1, 2, 3, 4)] == [0, 1, 1, 3]
    unranked = Generation("editing", [[]], ["greedy"], 0, [], [])
    assert rerank_prefix(unranked, 4) == 0
