"""The one owner of the token-id layout (DESIGN.md §5, STYLE.md §7; Chameleon's ``vocab.py``).

One id space holds three ranges, in this order::

    [0, S)          special tokens: <pad> <bos> <eos> <break> <mask> <eos_span>,
                    the CM3 sentinels <mask:0> .. <mask:N-1>, and reserved slots
                    <reserved:0> .. <reserved:R-1> that SFT names as task separators
    [S, S+T)        text tokens: BPE id t  -> S + t
    [S+T, S+T+K)    image tokens: VQ code c -> S + T + c

Nobody else adds offsets: every conversion goes through a :class:`Vocab`. It is saved as
``vocab.json`` beside the tokens and rebuilt from there; :attr:`Vocab.fingerprint` lets later
stages check they read tokens made with the same layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cm3leon.artifacts import atomic_write_json

BASE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<break>", "<mask>", "<eos_span>")
VOCAB_FILE = "vocab.json"


class VocabError(ValueError):
    """Ids outside the range a conversion expects, or an unknown special token."""


@dataclass(frozen=True)
class Vocab:
    text_size: int
    image_size: int
    num_sentinels: int = 16
    num_reserved: int = 16

    def __post_init__(self) -> None:
        for name in ("text_size", "image_size"):
            if getattr(self, name) < 1:
                raise VocabError(f"{name} must be >= 1")
        index = {name: i for i, name in enumerate(self.specials)}
        object.__setattr__(self, "_index", index)
        # read per token by is_special (CM3 masking, decoding): computed once
        object.__setattr__(self, "_num_specials", len(index))

    # --- layout -------------------------------------------------------------------------------
    @property
    def specials(self) -> tuple[str, ...]:
        sentinels = tuple(f"<mask:{i}>" for i in range(self.num_sentinels))
        reserved = tuple(f"<reserved:{i}>" for i in range(self.num_reserved))
        return BASE_SPECIALS + sentinels + reserved

    @property
    def num_specials(self) -> int:
        return self._num_specials  # type: ignore[attr-defined]

    @property
    def text_offset(self) -> int:
        return self.num_specials

    @property
    def image_offset(self) -> int:
        return self.num_specials + self.text_size

    @property
    def size(self) -> int:
        return self.image_offset + self.image_size

    # --- specials -----------------------------------------------------------------------------
    def special(self, name: str) -> int:
        try:
            return self._index[name]  # type: ignore[attr-defined]
        except KeyError:
            raise VocabError(f"unknown special token {name!r}") from None

    @property
    def pad(self) -> int:
        return self.special("<pad>")

    @property
    def bos(self) -> int:
        return self.special("<bos>")

    @property
    def eos(self) -> int:
        return self.special("<eos>")

    @property
    def brk(self) -> int:
        return self.special("<break>")

    @property
    def mask(self) -> int:
        return self.special("<mask>")

    @property
    def eos_span(self) -> int:
        return self.special("<eos_span>")

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise VocabError(f"sentinel {i} out of range [0, {self.num_sentinels})")
        return self.special(f"<mask:{i}>")

    def reserved(self, i: int) -> int:
        if not 0 <= i < self.num_reserved:
            raise VocabError(f"reserved token {i} out of range [0, {self.num_reserved})")
        return self.special(f"<reserved:{i}>")

    def token_name(self, token: int) -> str:
        """Human-readable name of any id (for debugging and lineage)."""
        if self.is_special(token):
            return self.specials[token]
        if self.is_text(token):
            return f"<text:{token - self.text_offset}>"
        if self.is_image(token):
            return f"<image:{token - self.image_offset}>"
        raise VocabError(f"id {token} outside the vocabulary [0, {self.size})")

    # --- ranges -------------------------------------------------------------------------------
    def is_special(self, token: int) -> bool:
        return 0 <= token < self.num_specials

    def is_text(self, token: int) -> bool:
        return self.text_offset <= token < self.image_offset

    def is_image(self, token: int) -> bool:
        return self.image_offset <= token < self.size

    def image_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_offset) & (ids < self.size)

    def text_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.text_offset) & (ids < self.image_offset)

    def sentinel_mask(self, ids: torch.Tensor) -> torch.Tensor:
        first = self.sentinel(0) if self.num_sentinels else 0
        return (ids >= first) & (ids < first + self.num_sentinels)

    # --- conversions --------------------------------------------------------------------------
    def text_to_vocab(self, bpe_ids: Sequence[int]) -> list[int]:
        bad = [t for t in bpe_ids if not 0 <= t < self.text_size]
        if bad:
            raise VocabError(f"text ids {bad[:5]} outside the text range [0, {self.text_size})")
        return [self.text_offset + t for t in bpe_ids]

    def vocab_to_text(self, ids: Sequence[int]) -> list[int]:
        bad = [t for t in ids if not self.is_text(t)]
        if bad:
            raise VocabError(f"ids {bad[:5]} are not text tokens")
        return [t - self.text_offset for t in ids]

    def image_to_vocab(self, codes: Sequence[int]) -> list[int]:
        bad = [c for c in codes if not 0 <= c < self.image_size]
        if bad:
            raise VocabError(f"codes {bad[:5]} outside the codebook [0, {self.image_size})")
        return [self.image_offset + c for c in codes]

    def vocab_to_image(self, ids: Sequence[int]) -> list[int]:
        bad = [t for t in ids if not self.is_image(t)]
        if bad:
            raise VocabError(f"ids {bad[:5]} are not image tokens")
        return [t - self.image_offset for t in ids]

    # --- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {**asdict(self), "specials": list(self.specials), "size": self.size}

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / VOCAB_FILE
        atomic_write_json(path, {**self.to_dict(), "fingerprint": self.fingerprint})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Vocab:
        path = Path(folder) / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the tokenize stage first")
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = cls(
            text_size=data["text_size"],
            image_size=data["image_size"],
            num_sentinels=data["num_sentinels"],
            num_reserved=data["num_reserved"],
        )
        if data.get("fingerprint") != vocab.fingerprint:
            raise VocabError(
                f"{path}: stored fingerprint {data.get('fingerprint')} does not match the layout "
                f"it describes ({vocab.fingerprint}); edited or from another version"
            )
        return vocab
