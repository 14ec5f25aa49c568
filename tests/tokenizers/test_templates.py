"""Instruction templates: exact token layouts per task, loss masking, prompts."""

import pytest

from cm3leon.tasks import TASKS
from cm3leon.tokenizers.document import DocumentCodec
from cm3leon.tokenizers.templates import phrasing_for, render, render_prompt
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
    for task, spec in TASKS.items():
        assert len(spec.templates) >= 2 and phrasing_for(task, 7) == len(spec.templates) - 1
        for phrasing in range(len(spec.templates)):
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
    with pytest.raises(ValueError, match="unknown task"):
        render("poetry", 0, TEXTS, IMAGES, CODEC)
    with pytest.raises(ValueError, match=r"phrasings 0\.\.1"):
        render("vqa", 2, TEXTS, IMAGES, CODEC)
    with pytest.raises(ValueError, match="needs image 'target'"):
        render("editing", 0, TEXTS, {"image": IMAGE}, CODEC)
    with pytest.raises(ValueError, match="needs text field 'answer'"):
        render("vqa", 0, {"question": "q"}, IMAGES, CODEC)
    with pytest.raises(ValueError, match="outside the Vocab's image range"):
        render("text_to_image", 0, TEXTS, {"image": [0, 1, 2, 3]}, CODEC)


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


@pytest.mark.parametrize("task", TASKS)
def test_a_masked_example_is_the_unconditional_prompt_then_the_same_output(task):
    full = render(task, 0, TEXTS, IMAGES, CODEC)
    masked = render(task, 0, TEXTS, IMAGES, CODEC, mask_text=True)
    assert masked.ids[: masked.output_start] == render_prompt(
        task, 0, TEXTS, IMAGES, CODEC, mask_text=True
    )
    # the output is never masked (captioning's and VQA's output is a text field)
    assert masked.ids[masked.output_start :] == full.ids[full.output_start :]
