"""SFT example building: every task rendered from the tokens, split by image, loss layout."""

import pytest

from cm3leon.config import (
    DataConfig,
    SFTConfig,
    ShapeWorldConfig,
    TokenizeConfig,
    VQConfig,
    VQTrainConfig,
)
from cm3leon.data.prepare import prepare_corpus
from cm3leon.sft.finetuning import build_examples
from cm3leon.tasks import TASKS
from cm3leon.tokenizers.corpus_tokenization import tokenize_corpus
from cm3leon.tokenizers.document import DocumentCodec
from cm3leon.tokenizers.text import load_text_tokenizer
from cm3leon.tokenizers.tokens import read_split, read_task_tokens
from cm3leon.tokenizers.vocab import Vocab

DATA = DataConfig(shapeworld=ShapeWorldConfig(num_images=60))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tokenize = TokenizeConfig(
        text_vocab_size=300,
        vq=VQConfig(codebook_size=32, code_dim=8, channels=(16, 16)),
        train=VQTrainConfig(steps=3, batch_size=8),
    )
    prepare_corpus(DATA, 4, root / "corpus")
    tokenize_corpus(root / "corpus", DATA, tokenize, 4, root / "vq", root / "text", root / "tokens")
    vocab = Vocab.load(root / "tokens")
    return root, DocumentCodec(vocab, load_text_tokenizer(root / "text"), 64)


def test_every_task_has_examples_from_the_right_split(tokens):
    root, codec = tokens
    examples = build_examples(root / "tokens", codec, SFTConfig())
    train_docs = read_split(root / "tokens", "train").num_rows
    assert set(examples["train"]) == set(TASKS)
    assert len(examples["train"]["captioning"]) == train_docs
    train_ids = set(read_split(root / "tokens", "train").column("id").to_pylist())
    vqa_rows = read_task_tokens(root / "tokens", "vqa").column("image_id").to_pylist()
    assert len(examples["train"]["vqa"]) == sum(i in train_ids for i in vqa_rows)


def test_sequences_start_with_bos_end_with_eos_and_mark_the_output(tokens):
    root, codec = tokens
    vocab = codec.vocab
    for config in (SFTConfig(), SFTConfig(loss_on_output_only=True, phrasing=1)):
        examples = build_examples(root / "tokens", codec, config)
        for task in TASKS:
            s = examples["train"][task][0]
            assert s.ids[0] == vocab.bos and s.ids[-1] == vocab.eos
            assert s.weights[0] == 0.0
            prompt_weights = set(s.weights[1 : s.query_start])
            assert prompt_weights == ({0.0} if config.loss_on_output_only else {1.0})
            assert set(s.weights[s.query_start :]) == {1.0}
    edit = build_examples(root / "tokens", codec, SFTConfig())["train"]["editing"][0]
    assert sum(vocab.is_image(t) for t in edit.ids) == 128  # source and edited image


def test_null_condition_examples_mask_the_prompt_text_of_guidable_tasks_only(tokens):
    root, codec = tokens
    vocab = codec.vocab
    assert "train_null" not in build_examples(root / "tokens", codec, SFTConfig())
    examples = build_examples(
        root / "tokens", codec, SFTConfig(null_condition_fraction=0.1, loss_on_output_only=True)
    )
    null = examples["train_null"]
    assert set(null) == {"text_to_image", "editing", "grounding", "segmentation"}
    for task, masked in null.items():
        assert len(masked) == len(examples["train"][task])  # index for index
        for plain, m in zip(examples["train"][task], masked, strict=True):
            # the same output after a prompt whose text is <mask:0>
            assert m.ids[m.query_start :] == plain.ids[plain.query_start :]
            assert vocab.sentinel(0) in m.ids[: m.query_start]
            assert len(m.ids) < len(plain.ids)
    caption = examples["train"]["text_to_image"][0]
    assert null["text_to_image"][0].ids[: caption.query_start][:3] == [
        vocab.bos,
        vocab.sentinel(0),
        vocab.brk,
    ]
