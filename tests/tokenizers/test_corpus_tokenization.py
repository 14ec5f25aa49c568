"""The tokenize library call end to end on a tiny corpus, and the tokens artifact's checks."""

import hashlib

import pytest

from cm3leon.config import (
    DataConfig,
    ShapeWorldConfig,
    TokenizeConfig,
    VQConfig,
    VQTrainConfig,
)
from cm3leon.data.corpus import read_documents, read_task_table
from cm3leon.data.prepare import prepare_corpus
from cm3leon.data.scene_judge import load_judge
from cm3leon.tokenizers.corpus_tokenization import tokenize_corpus
from cm3leon.tokenizers.document import DocumentCodec
from cm3leon.tokenizers.text import load_text_tokenizer
from cm3leon.tokenizers.tokens import (
    TokensMismatchError,
    check_tokens,
    read_split,
    read_task_tokens,
)
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.tokenizers.vq_training import load_vq

DATA = DataConfig(shapeworld=ShapeWorldConfig(num_images=80))
TOKENIZE = TokenizeConfig(
    text_vocab_size=300,
    vq=VQConfig(codebook_size=32, code_dim=8, channels=(16, 16)),
    train=VQTrainConfig(steps=15, batch_size=8, log_every=5),
)


def digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    prepare_corpus(DATA, 3, root / "corpus")
    logs = []
    result = tokenize_corpus(
        root / "corpus",
        DATA,
        TOKENIZE,
        3,
        root / "vq",
        root / "text",
        root / "tokens",
        on_log=lambda step, m: logs.append(step),
        judge=load_judge(root / "corpus"),
    )
    return root, result, logs


def test_outputs_and_metrics(run):
    root, result, logs = run
    assert logs == [0, 5, 10, 14]
    for key in (
        "psnr_db",
        "mse",
        "codebook_usage_percent",
        "codebook_perplexity",
        "mask_iou",
        "parser_attribute_agreement",
    ):
        assert key in result.metrics
    assert 0 <= result.metrics["codebook_usage_percent"] <= 100
    assert result.originals.shape == result.reconstructions.shape
    assert result.manifest["grid"] == [8, 8]
    assert (root / "vq" / "model.safetensors").is_file()
    assert (root / "text" / "tokenizer.json").is_file()


def test_documents_round_trip_to_corpus_captions(run):
    root, _, _ = run
    vocab = Vocab.load(root / "tokens")
    codec = DocumentCodec(vocab, load_text_tokenizer(root / "text"), image_tokens=64)
    corpus = read_documents(root / "corpus", ["id", "caption", "captions"], split="train")
    tokens = read_split(root / "tokens", "train")
    assert tokens.column("id").to_pylist() == corpus.column("id").to_pylist()
    for row, original in zip(tokens.to_pylist()[:10], corpus.to_pylist()[:10], strict=True):
        document = row["caption_ids"] + [vocab.brk] + row["image_ids"]
        caption, codes = codec.decode(document)
        assert caption == original["caption"]
        assert len(codes) == 64 and all(0 <= c < 32 for c in codes)
        decoded = [codec.decode_text(ids) for ids in row["paraphrase_ids"]]
        assert decoded[0] == original["caption"] and set(decoded) == set(original["captions"])


def test_task_tables_are_tokenized(run):
    root, _, _ = run
    vocab = Vocab.load(root / "tokens")
    for name, image_column in (("edits", "target_image_ids"), ("segmentation", "mask_image_ids")):
        table = read_task_tokens(root / "tokens", name)
        assert table.num_rows == read_task_table(root / "corpus", name).num_rows
        assert all(
            len(ids) == 64 and all(vocab.is_image(t) for t in ids)
            for ids in table.column(image_column).to_pylist()
        )
    vqa = read_task_tokens(root / "tokens", "vqa").to_pylist()
    codec = DocumentCodec(vocab, load_text_tokenizer(root / "text"), image_tokens=64)
    assert all(codec.decode_text(r["answer_ids"]) == r["answer"] for r in vqa)


def test_same_seed_gives_byte_identical_tokens(run, tmp_path):
    root, _, _ = run
    tokenize_corpus(
        root / "corpus", DATA, TOKENIZE, 3, tmp_path / "vq", tmp_path / "text", tmp_path / "tokens"
    )
    assert digest(tmp_path / "tokens") == digest(root / "tokens")
    assert digest(tmp_path / "vq") == digest(root / "vq")


def test_loading_a_vq_checkpoint_skips_training(run, tmp_path):
    root, _, _ = run
    config = TokenizeConfig(**{**TOKENIZE.__dict__, "vq_checkpoint": str(root / "vq")})
    logs = []
    tokenize_corpus(
        root / "corpus",
        DATA,
        config,
        3,
        tmp_path / "vq",
        tmp_path / "text",
        tmp_path / "tokens",
        on_log=lambda s, m: logs.append(s),
    )
    assert logs == []
    assert load_vq(tmp_path / "vq")[1] == load_vq(root / "vq")[1]


def test_mismatched_vocab_or_vq_is_reported(run):
    root, _, _ = run
    vocab = Vocab.load(root / "tokens")
    _, fingerprint = load_vq(root / "vq")
    assert check_tokens(root / "tokens", vocab, fingerprint)["vq_fingerprint"] == fingerprint
    other = Vocab(text_size=vocab.text_size, image_size=vocab.image_size, num_sentinels=8)
    with pytest.raises(TokensMismatchError, match="tokenized with vocab"):
        check_tokens(root / "tokens", other)
    with pytest.raises(TokensMismatchError, match="VQ tokenizer"):
        check_tokens(root / "tokens", vocab, "0123456789abcdef")
