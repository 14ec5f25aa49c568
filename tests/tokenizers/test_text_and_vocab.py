"""BPE round trips (non-ASCII included), Vocab layout invariants, document format round trips."""

import pytest
import torch

from cm3leon.tokenizers.document import DocumentCodec
from cm3leon.tokenizers.text import load_text_tokenizer, save_text_tokenizer, train_text_tokenizer
from cm3leon.tokenizers.vocab import BASE_SPECIALS, Vocab, VocabError

CAPTIONS = [
    "a large red circle at the top left",
    "there is a small blue square at the center",
    "top left: large red circle, center: small blue square",
    "an image with a small green triangle at the bottom right",
] * 5
UNICODE = ["naïve café crème brûlée", "東京の赤い丸", "emoji 🟥🔵 ok", "tab\tand  two spaces", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(CAPTIONS, vocab_size=300)


def test_bpe_round_trips_any_unicode(tokenizer):
    for text in CAPTIONS[:4] + UNICODE:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.get_vocab_size() <= 300
    # merges learned: a frequent word is one token
    assert len(tokenizer.encode(" circle").ids) == 1  # merges learned: a frequent word


def test_bpe_training_is_deterministic_and_saves(tokenizer, tmp_path):
    again = train_text_tokenizer(CAPTIONS, vocab_size=300)
    assert again.to_str() == tokenizer.to_str()
    save_text_tokenizer(tokenizer, tmp_path)
    assert load_text_tokenizer(tmp_path).encode(UNICODE[1]).ids == tokenizer.encode(UNICODE[1]).ids
    with pytest.raises(ValueError, match="256"):
        train_text_tokenizer(CAPTIONS, vocab_size=100)


def test_vocab_layout_invariants():
    vocab = Vocab(text_size=300, image_size=256, num_sentinels=4, num_reserved=2)
    assert vocab.specials[: len(BASE_SPECIALS)] == BASE_SPECIALS
    assert vocab.pad == 0
    assert vocab.num_specials == len(BASE_SPECIALS) + 4 + 2 == len(set(vocab.specials))
    assert vocab.text_offset == vocab.num_specials
    assert vocab.image_offset == vocab.num_specials + 300
    assert vocab.size == vocab.num_specials + 300 + 256
    assert [vocab.sentinel(i) for i in range(4)] == list(range(6, 10))
    # the three ranges partition [0, size)
    for token in range(vocab.size):
        assert vocab.is_special(token) + vocab.is_text(token) + vocab.is_image(token) == 1
    assert vocab.text_to_vocab([0, 299]) == [vocab.text_offset, vocab.image_offset - 1]
    assert vocab.vocab_to_image(vocab.image_to_vocab([0, 255])) == [0, 255]
    ids = torch.tensor([vocab.brk, vocab.text_offset, vocab.image_offset, vocab.sentinel(3)])
    assert vocab.text_mask(ids).tolist() == [False, True, False, False]
    assert vocab.image_mask(ids).tolist() == [False, False, True, False]
    assert vocab.sentinel_mask(ids).tolist() == [False, False, False, True]
    assert vocab.token_name(vocab.image_offset + 7) == "<image:7>"


def test_vocab_rejects_out_of_range_ids():
    vocab = Vocab(text_size=10, image_size=4)
    with pytest.raises(VocabError, match="codebook"):
        vocab.image_to_vocab([4])
    with pytest.raises(VocabError, match="not text tokens"):
        vocab.vocab_to_text([vocab.image_offset])
    with pytest.raises(VocabError, match="sentinel 16 out of range"):
        vocab.sentinel(16)
    with pytest.raises(VocabError, match="unknown special"):
        vocab.special("<nope>")


def test_vocab_save_load_and_fingerprint(tmp_path):
    vocab = Vocab(text_size=300, image_size=256)
    vocab.save(tmp_path)
    assert Vocab.load(tmp_path) == vocab
    assert Vocab(text_size=300, image_size=128).fingerprint != vocab.fingerprint
    text = (tmp_path / "vocab.json").read_text().replace('"image_size": 256', '"image_size": 128')
    (tmp_path / "vocab.json").write_text(text)
    with pytest.raises(VocabError, match="fingerprint"):
        Vocab.load(tmp_path)


def test_document_round_trip(tokenizer):
    vocab = Vocab(text_size=300, image_size=16)
    codec = DocumentCodec(vocab, tokenizer, image_tokens=4)
    for caption in CAPTIONS[:4] + UNICODE:
        ids = codec.encode(caption, [3, 0, 15, 7])
        assert ids.count(vocab.brk) == 1
        assert all(vocab.is_image(t) for t in ids[-4:])
        assert all(vocab.is_text(t) for t in ids[: ids.index(vocab.brk)])
        assert codec.decode(ids) == (caption, [3, 0, 15, 7])
    with pytest.raises(VocabError, match="4 codes"):
        codec.encode("x", [1, 2])
    with pytest.raises(VocabError, match="no <break>"):
        codec.decode(codec.encode_text("hello"))


def test_codec_refuses_a_tokenizer_larger_than_the_vocab(tokenizer):
    with pytest.raises(VocabError, match="different tokenize runs"):
        DocumentCodec(Vocab(text_size=100, image_size=16), tokenizer, image_tokens=4)
