"""SFT templates: exact token layouts per task, loss masking; the task-mixing sampler."""

import pytest

from cm3leon.sft.mixing import mixture
from cm3leon.sft.templates import TASKS, TEMPLATES, render, render_prompt
from cm3leon.tokenizers.document import DocumentCodec
from cm3leon.tokenizers.text import train_text_tokenizer
from cm3leon.tokenizers.vocab import Vocab

VOCAB = Vocab(text_size=300, image_size=16)
TOKENIZER = train_text_tokenizer(["a red circle at the top", "segment the circle"] * 4, 300)
CODEC = DocumentCodec(VOCAB, TOKENIZER, image_tokens=4)
IMAGE = VOCAB.image_to_vocab([1, 2, 3, 4])
TARGET = VOCAB.image_to_vocab([5, 6, 7, 8])
TEXTS = {
    "caption": "a red circle at the top",
    "question": "what color is the circle?",
    "answer": "red",
    "instruction": "segment the circle",
    "prompt": "a red circle in box (1, 1, 10, 10)",
}
IMAGES = {"image": IMAGE, "target": TARGET, "mask": TARGET}
text = CODEC.encode_text
B, E = VOCAB.brk, VOCAB.eos


def test_every_task_has_two_phrasings_and_renders():
    for task in TASKS:
        assert len(TEMPLATES[task]) >= 2
        for phrasing in range(len(TEMPLATES[task])):
            example = render(task, phrasing, TEXTS, IMAGES, CODEC)
            assert example.ids[-1] == E and len(example.weights) == len(example.ids)
            assert 0 < example.output_start < len(example.ids)


@pytest.mark.parametrize(
    ("task", "expected", "output_start"),
    [
        (
            "text_to_image",
            lambda: [*text(TEXTS["caption"]), B, *IMAGE, E],
            len(text(TEXTS["caption"])) + 1,
        ),
        (
            "captioning",
            lambda: [
                *text("Describe the given picture."),
                B,
                *IMAGE,
                B,
                *text(TEXTS["caption"]),
                E,
            ],
            len(text("Describe the given picture.")) + 6,
        ),
        (
            "vqa",
            lambda: [
                *IMAGE,
                B,
                *text("Question: what color is the circle? Answer:"),
                *text("red"),
                E,
            ],
            5 + len(text("Question: what color is the circle? Answer:")),
        ),
        (
            "editing",
            lambda: [
                *text("Edit first image following the instruction"),
                B,
                *IMAGE,
                B,
                *text(TEXTS["instruction"]),
                B,
                *TARGET,
                E,
            ],
            len(text("Edit first image following the instruction"))
            + 6
            + len(text(TEXTS["instruction"]))
            + 1,
        ),
        (
            "segmentation",
            lambda: [*IMAGE, B, *text(TEXTS["instruction"]), B, *TARGET, E],
            5 + len(text(TEXTS["instruction"])) + 1,
        ),
    ],
)
def test_exact_layouts(task, expected, output_start):
    example = render(task, 0, TEXTS, IMAGES, CODEC)
    assert example.ids == expected()
    assert example.output_start == output_start


def test_loss_on_output_only_masks_the_prompt():
    full = render("vqa", 0, TEXTS, IMAGES, CODEC)
    masked = render("vqa", 0, TEXTS, IMAGES, CODEC, loss_on_output_only=True)
    assert full.weights == [1.0] * len(full.ids)
    assert masked.weights[: masked.output_start] == [0.0] * masked.output_start
    assert masked.weights[masked.output_start :] == [1.0] * (len(masked.ids) - masked.output_start)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown SFT task"):
        render("poetry", 0, TEXTS, IMAGES, CODEC)
    with pytest.raises(ValueError, match=r"phrasings 0\.\.1"):
        render("vqa", 2, TEXTS, IMAGES, CODEC)
    with pytest.raises(ValueError, match="needs image 'target'"):
        render("editing", 0, TEXTS, {"image": IMAGE}, CODEC)
    with pytest.raises(ValueError, match="needs text field 'answer'"):
        render("vqa", 0, {"question": "q"}, IMAGES, CODEC)
    with pytest.raises(ValueError, match="outside the Vocab's image range"):
        render("text_to_image", 0, TEXTS, {"image": [0, 1, 2, 3]}, CODEC)


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


@pytest.mark.parametrize("task", TASKS)
def test_prompt_is_the_example_up_to_its_output(task):
    example = render(task, 0, TEXTS, IMAGES, CODEC)
    assert render_prompt(task, 0, TEXTS, IMAGES, CODEC) == example.ids[: example.output_start]


def test_unconditional_prompt_masks_text_fields_only():
    uncond = render_prompt("editing", 0, TEXTS, IMAGES, CODEC, mask_text=True)
    head = text("Edit first image following the instruction")
    assert uncond == [*head, B, *IMAGE, B, VOCAB.sentinel(0), B]
    assert render_prompt("text_to_image", 0, TEXTS, IMAGES, CODEC, mask_text=True) == [
        VOCAB.sentinel(0),
        B,
    ]
