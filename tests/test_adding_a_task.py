"""Adding a task is its spec, its table builder and (here, reused) its scorer: nothing else.

A made-up ``counting`` task (a table of "how many objects?" rows, scored like VQA) is put into
the registry and the ShapeWorld builders only; the corpus, validation, tokens, SFT examples,
mixing weights and prompts then carry it without another line changed.
"""

import pytest

from cm3leon.config import (
    DataConfig,
    SFTConfig,
    ShapeWorldConfig,
    TokenizeConfig,
    ValidateConfig,
    VQConfig,
    VQTrainConfig,
)
from cm3leon.data import tasks as shapeworld_tasks
from cm3leon.data.corpus import read_manifest, read_task_table
from cm3leon.data.prepare import prepare_corpus
from cm3leon.data.validation import validate_corpus
from cm3leon.evaluation.tasks import SCORERS, task_inputs
from cm3leon.sft.finetuning import build_examples
from cm3leon.tasks import TABLE_TASKS, TASKS, VQA, TaskSpec
from cm3leon.tokenizers.corpus_tokenization import tokenize_corpus
from cm3leon.tokenizers.document import DocumentCodec
from cm3leon.tokenizers.templates import render_prompt
from cm3leon.tokenizers.text import load_text_tokenizer
from cm3leon.tokenizers.tokens import read_task_tokens
from cm3leon.tokenizers.vocab import Vocab

COUNTING = TaskSpec(
    name="counting",
    table="counts",
    texts=("question", "answer"),
    output="text",
    templates=(
        "<image:image> <break> Count: {question} <output> {answer}",
        "<image:image> <break> {question} <output> {answer}",
    ),
    scorer="vqa",
    headline="accuracy",
    needs_judge=False,
    truth="answer",
    table_schema=VQA.table_schema,  # the same columns as VQA's table
    tokens_schema=VQA.tokens_schema,
)


def count_rows(image_id, scene, config, size, rng):
    """The task's ShapeWorld table builder: one row per scene."""
    question = "how many objects are there?"
    return [
        {
            "image_id": image_id,
            "question": question,
            "answer": str(len(scene)),
            "question_type": "count",
        }
    ]


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(TASKS, "counting", COUNTING)
    monkeypatch.setitem(TABLE_TASKS, "counts", COUNTING)
    monkeypatch.setitem(shapeworld_tasks.ROW_BUILDERS, "counts", count_rows)


def test_a_new_task_flows_through_every_artifact(registered, tmp_path):
    data = DataConfig(shapeworld=ShapeWorldConfig(num_images=40))
    prepare_corpus(data, 3, tmp_path / "corpus")
    assert read_manifest(tmp_path / "corpus")["tasks"]["counts"] == 40
    assert read_task_table(tmp_path / "corpus", "counts").num_rows == 40
    report = validate_corpus(tmp_path / "corpus", data, ValidateConfig(), tmp_path / "validation")
    assert report.success and report.metrics["task_counts_rows"] == 40

    tokenize = TokenizeConfig(
        text_vocab_size=300,
        vq=VQConfig(codebook_size=32, code_dim=8, channels=(16, 16)),
        train=VQTrainConfig(steps=2, batch_size=8),
    )
    tokenize_corpus(
        tmp_path / "corpus", data, tokenize, 3, tmp_path / "vq", tmp_path / "text", tmp_path / "tok"
    )
    rows = read_task_tokens(tmp_path / "tok", "counts").to_pylist()
    codec = DocumentCodec(Vocab.load(tmp_path / "tok"), load_text_tokenizer(tmp_path / "text"), 64)
    assert rows[0]["answer_ids"] == codec.encode_text(rows[0]["answer"])

    config = SFTConfig(mixing={"counting": 3.0})
    assert config.mixing["counting"] == 3.0 and config.mixing["vqa"] == 1.0
    examples = build_examples(tmp_path / "tok", codec, config)
    counting = examples["train"]["counting"]
    assert counting and counting[0].ids[-2] == codec.encode_text(rows[0]["answer"])[-1]

    image = codec.vocab.image_to_vocab([i % 32 for i in range(64)])
    (item,) = task_inputs(COUNTING, [{**rows[0], "image_ids": image, "pixels": None}])
    assert item.texts == {"question": rows[0]["question"]} and "image" in item.images
    prompt = render_prompt("counting", 0, item.texts, item.images, codec)
    assert prompt[:64] == image and COUNTING.scorer in SCORERS
