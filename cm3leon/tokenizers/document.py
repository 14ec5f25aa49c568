"""CM3Leon's document format: a caption-image pair is ``caption <break> image-tokens``.

Retrieved documents are prepended to a query document at training and generation time, each
followed by ``<eos>`` (assembled by the training data pipeline, DESIGN.md §7); this module owns
a single document's layout and its exact inverse. Captions go through the byte-level BPE, so
``decode(encode(caption, codes)) == (caption, codes)`` for any Unicode caption.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from cm3leon.tokenizers.vocab import Vocab, VocabError


class DocumentCodec:
    """Encode/decode documents and captions in the shared :class:`Vocab` id space."""

    def __init__(self, vocab: Vocab, tokenizer: Tokenizer, image_tokens: int) -> None:
        if tokenizer.get_vocab_size() > vocab.text_size:
            raise VocabError(
                f"text tokenizer has {tokenizer.get_vocab_size()} tokens but the vocab reserves "
                f"{vocab.text_size}: they come from different tokenize runs"
            )
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens

    def encode_text(self, text: str) -> list[int]:
        return self.vocab.text_to_vocab(self.tokenizer.encode(text).ids)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self.vocab.vocab_to_text(ids), skip_special_tokens=False)

    def encode_image(self, codes: Sequence[int]) -> list[int]:
        if len(codes) != self.image_tokens:
            raise VocabError(f"an image is {self.image_tokens} codes, got {len(codes)}")
        return self.vocab.image_to_vocab(codes)

    def encode(self, caption: str, codes: Sequence[int]) -> list[int]:
        """``caption <break> image``."""
        return [*self.encode_text(caption), self.vocab.brk, *self.encode_image(codes)]

    def decode(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """Inverse of :meth:`encode`: ``(caption, codes)``."""
        ids = list(ids)
        if self.vocab.brk not in ids:
            raise VocabError("not a document: no <break> between caption and image")
        cut = ids.index(self.vocab.brk)
        codes = self.vocab.vocab_to_image(ids[cut + 1 :])
        if len(codes) != self.image_tokens:
            raise VocabError(f"an image is {self.image_tokens} codes, got {len(codes)}")
        return self.decode_text(ids[:cut]), codes
