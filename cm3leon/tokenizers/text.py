"""Byte-level BPE text tokenizer, trained with Hugging Face ``tokenizers`` (DESIGN.md §5).

Byte-level means every Unicode string maps to bytes first, so any caption — accents, CJK,
emoji — encodes without unknown tokens and decodes back exactly. The trained tokenizer is saved
as the library's own JSON (``tokenizer.json``) and loaded from there by every later stage.
Its ids are *BPE-local*; :class:`~cm3leon.tokenizers.vocab.Vocab` places them in the shared
id space.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cm3leon.artifacts import atomic_write_text

TOKENIZER_FILE = "tokenizer.json"


def train_text_tokenizer(captions: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (256 byte tokens + merges)."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    return tokenizer


def save_text_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
    path = Path(folder) / TOKENIZER_FILE
    atomic_write_text(path, tokenizer.to_str(pretty=True))
    return path


def load_text_tokenizer(folder: str | Path) -> Tokenizer:
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the tokenize stage first")
    return Tokenizer.from_file(str(path))
