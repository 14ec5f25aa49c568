"""The task registry: one :class:`TaskSpec` per SFT / evaluation task (CM3Leon §4; STYLE.md §16).

Everything that iterates over tasks iterates over :data:`TASKS` — the corpus and tokens
artifacts (their task tables and schemas), validation, tokenization, the SFT templates and
mixing, prompting at inference, evaluation and the report. A task is spelled one way
(``editing``); the table it reads is a property of the task (``edits``).

A task's inputs are the text fields and images its template names (``{field}``,
``<image:slot>``). Text-to-image and captioning read the corpus documents themselves
(``table=None``: text field ``caption``, image ``image``); the others read a task table whose
rows point at their document by ``image_id``. An image the task produces (an edit's target, a
segmentation mask) is an :class:`ImageField`: stored raw in the corpus table, tokenized into the
tokens table.

Adding a task touches this file (its spec, table schemas and template phrasings), its table
builder (:mod:`cm3leon.data.tasks` for ShapeWorld), and its scorer
(:mod:`cm3leon.evaluation.tasks`, keyed by ``TaskSpec.scorer``); the rest follows from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

IDS = pa.list_(pa.int32())  # a column of Vocab ids


@dataclass(frozen=True)
class ImageField:
    """An image a task row carries besides its document's: the template's ``<image:slot>``,
    the raw ``(H, W, channels)`` uint8 bytes in corpus column ``column``, and its Vocab ids in
    tokens column ``tokens_column``. One-channel images (masks) are drawn white on black in
    RGB before VQ encoding."""

    slot: str
    column: str
    channels: int
    tokens_column: str


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its examples come from, how it is prompted, how it is scored.

    - ``table``: the corpus/tokens task table, or ``None`` for the documents themselves;
    - ``texts``: the row's text fields the template fills (tokenized as ``<field>_ids``);
    - ``image``: the image the task produces from the row, if any (``None``: the document's);
    - ``output``: what the model generates, ``"image"`` or ``"text"``;
    - ``templates``: the instruction phrasings (:mod:`cm3leon.tokenizers.templates`);
    - ``query``: the text field that retrieves memory-bank documents (and re-ranks the image
      samples of a :attr:`reranked` task); ``None`` retrieves by the input image;
    - ``scorer``: which scorer of :mod:`cm3leon.evaluation.tasks` judges it, ``headline`` its
      headline metric key, ``truth`` the row's column the output is judged against (``None``:
      the task's image), ``needs_judge`` whether that headline needs a scene judge (the
      ShapeWorld parser, :mod:`cm3leon.data.scene_judge`) rather than references alone, and
      ``generic_headline`` the metric that heads the task when the corpus has no judge
      (``None``: the task is not scored without one). :func:`headline_metric` picks.

    The fields a template names before ``<output>`` are the task's inputs
    (:attr:`input_texts`, :attr:`input_images`); the rest is what the model produces.
    """

    name: str
    table: str | None
    texts: tuple[str, ...]
    output: Literal["image", "text"]
    templates: tuple[str, ...]
    scorer: str
    headline: str
    needs_judge: bool
    generic_headline: str | None = None
    truth: str | None = None
    query: str | None = None
    image: ImageField | None = None
    table_schema: pa.Schema | None = None  # the corpus task table
    tokens_schema: pa.Schema | None = None  # the same rows tokenized

    def __post_init__(self) -> None:
        if (self.table is None) != (self.table_schema is None) or (self.table is None) != (
            self.tokens_schema is None
        ):
            raise ValueError(f"task {self.name!r}: a table needs both its schemas, and only then")
        if len(self.templates) < 1 or any("<output>" not in t for t in self.templates):
            raise ValueError(f"task {self.name!r}: every template needs an <output> marker")

    @property
    def input_texts(self) -> tuple[str, ...]:
        """Text fields the prompt holds (before ``<output>`` in the first phrasing)."""
        return tuple(re.findall(r"\{(\w+)\}", self.templates[0].split("<output>")[0]))

    @property
    def writes_caption(self) -> bool:
        """Text out of a document's own image (no task table): the output is a caption, so
        ``log p(image | output)`` through text-to-image can judge it (caption re-ranking)."""
        return self.table is None and self.output == "text"

    @property
    def reranked(self) -> bool:
        """An image out of a document's own caption (no task table): several samples are drawn
        and re-ranked against the prompt by the dual encoder and the captioner, both trained on
        captions (CLIP re-ranking, CM3Leon §3). An image task with a table has one right output
        for a prompt those re-rankers do not read (grounding's boxes, an edit instruction, a
        mask request) and is decoded like an answer: re-ranking grounding's samples by them
        lost to one greedy sample, 0.48 vs 0.56, paired +0.08 [+0.016, +0.143] (README)."""
        return self.table is None and self.output == "image"

    @property
    def guidable(self) -> bool:
        """An image output from a prompt holding text: classifier-free guidance applies, with the
        prompt's text masked as the unconditional stream (``render_prompt(mask_text=True)``)."""
        return self.output == "image" and bool(self.input_texts)

    @property
    def image_count(self) -> int:
        """Images in an example (input and output): what mostly sets its length, and so the
        length group of SFT's ``train.length_grouping``."""
        return len(re.findall(r"<image:(\w+)>", self.templates[0]))

    @property
    def input_images(self) -> tuple[str, ...]:
        """Image slots the prompt holds (before ``<output>`` in the first phrasing)."""
        return tuple(re.findall(r"<image:(\w+)>", self.templates[0].split("<output>")[0]))


TEXT_TO_IMAGE = TaskSpec(
    name="text_to_image",
    table=None,
    texts=("caption",),
    output="image",
    templates=(
        "{caption} <break> <output> <image:image>",
        "Generate an image of: {caption} <break> <output> <image:image>",
    ),
    scorer="scene",
    headline="accuracy",
    needs_judge=True,
    generic_headline="r_precision",
    truth="objects",
    query="caption",
)
CAPTIONING = TaskSpec(
    name="captioning",
    table=None,
    texts=("caption",),
    output="text",
    templates=(
        "Describe the given picture. <break> <image:image> <break> <output> {caption}",
        "What is in this image? <break> <image:image> <break> <output> {caption}",
    ),
    scorer="caption",
    headline="attribute_exact_match",
    needs_judge=True,
    generic_headline="cider_d",
    truth="objects",
)
VQA = TaskSpec(
    name="vqa",
    table="vqa",
    texts=("question", "answer"),
    output="text",
    templates=(
        "<image:image> <break> Question: {question} Answer: <output> {answer}",
        "<image:image> <break> Q: {question} A: <output> {answer}",
    ),
    scorer="vqa",
    headline="accuracy",
    needs_judge=False,
    truth="answer",
    table_schema=pa.schema(
        [
            ("image_id", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("answers", pa.list_(pa.string())),  # every reference answer (VQAv2: ten humans')
            ("question_type", pa.string()),
        ]
    ),
    tokens_schema=pa.schema(
        [
            ("image_id", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("answers", pa.list_(pa.string())),  # every reference answer (VQAv2: ten humans')
            ("question_type", pa.string()),
            ("question_ids", IDS),
            ("answer_ids", IDS),
        ]
    ),
)
EDITING = TaskSpec(
    name="editing",
    table="edits",
    texts=("instruction",),
    output="image",
    templates=(
        "Edit first image following the instruction <break> <image:image> <break> {instruction}"
        " <break> <output> <image:target>",
        "Apply the edit to the picture <break> <image:image> <break> {instruction}"
        " <break> <output> <image:target>",
    ),
    scorer="scene",
    headline="accuracy",
    needs_judge=True,
    generic_headline="target_similarity_dual_encoder",
    truth="target_objects",
    image=ImageField("target", "target_image", 3, "target_image_ids"),
    table_schema=pa.schema(
        [
            ("image_id", pa.string()),
            ("instruction", pa.string()),
            ("edit_type", pa.string()),
            ("target_image", pa.binary()),  # raw (H, W, 3) uint8
            ("target_objects", pa.string()),
        ]
    ),
    tokens_schema=pa.schema(
        [
            ("image_id", pa.string()),
            ("instruction", pa.string()),
            ("edit_type", pa.string()),
            ("instruction_ids", IDS),
            ("target_image_ids", IDS),
            ("target_objects", pa.string()),
        ]
    ),
)
GROUNDING = TaskSpec(
    name="grounding",
    table="grounding",
    texts=("prompt",),
    output="image",
    templates=(
        "{prompt} <break> <output> <image:image>",
        "Draw exactly these objects: {prompt} <break> <output> <image:image>",
    ),
    scorer="scene",
    headline="accuracy",
    needs_judge=True,
    generic_headline="target_similarity_dual_encoder",
    truth="objects",
    query="prompt",
    table_schema=pa.schema(
        [
            ("image_id", pa.string()),
            ("prompt", pa.string()),
            ("objects", pa.string()),
        ]
    ),
    tokens_schema=pa.schema(
        [
            ("image_id", pa.string()),
            ("prompt", pa.string()),
            ("prompt_ids", IDS),
            ("objects", pa.string()),
        ]
    ),
)
SEGMENTATION = TaskSpec(
    name="segmentation",
    table="segmentation",
    texts=("instruction",),
    output="image",
    templates=(
        "<image:image> <break> {instruction} <break> <output> <image:mask>",
        "<image:image> <break> Show the mask: {instruction} <break> <output> <image:mask>",
    ),
    scorer="mask_iou",
    headline="mean_iou",
    needs_judge=False,
    image=ImageField("mask", "mask", 1, "mask_image_ids"),
    table_schema=pa.schema(
        [
            ("image_id", pa.string()),
            ("instruction", pa.string()),
            ("mask", pa.binary()),  # raw (H, W) uint8, 0 or 255
            ("target_object", pa.string()),
        ]
    ),
    tokens_schema=pa.schema(
        [
            ("image_id", pa.string()),
            ("instruction", pa.string()),
            ("instruction_ids", IDS),
            ("mask_image_ids", IDS),
            ("target_object", pa.string()),
        ]
    ),
)

# The registry, in the order every artifact, mixture and report lists the tasks.
TASKS: Mapping[str, TaskSpec] = {
    t.name: t for t in (TEXT_TO_IMAGE, CAPTIONING, VQA, EDITING, GROUNDING, SEGMENTATION)
}
TABLE_TASKS: Mapping[str, TaskSpec] = {t.table: t for t in TASKS.values() if t.table is not None}


def headline_metric(spec: TaskSpec, judged: bool) -> str | None:
    """The metric key that heads task ``spec``: its exact ``headline`` when a scene judge
    scores the corpus (or the headline needs none), else its ``generic_headline``."""
    if judged or not spec.needs_judge:
        return spec.headline
    return spec.generic_headline


def task(name: str) -> TaskSpec:
    """The spec of task ``name``; an unknown name is an error naming the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {list(TASKS)}")
    return TASKS[name]


def table_spec(table: str) -> TaskSpec:
    """The task whose examples live in task table ``table`` (e.g. ``edits`` -> editing)."""
    if table not in TABLE_TASKS:
        raise ValueError(f"unknown task table {table!r}; known: {list(TABLE_TASKS)}")
    return TABLE_TASKS[table]
