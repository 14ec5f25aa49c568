"""Retrieval-augmented CM3 training sequences (DESIGN.md §7; RA-CM3 / CM3Leon §2).

A training sequence for document ``d`` with retrieved neighbors ``r1..rk``::

    <bos> r1 <eos> r2 <eos> ... rk <eos> CM3(d) <eos>

where each document is ``caption <break> image`` (:mod:`cm3leon.tokenizers.document`), ``k``
is drawn uniformly from ``0..retrieval_k_max`` per sample (RA-CM3's sampling; capped by the
neighbors the index stage found) or, with ``train.length_grouping``, once per optimizer step
(:meth:`RetrievalAugmentedSequences.neighbor_count`: the same marginal, but a step's sequences
then have about one length and pad little), and CM3 masks spans of the query document only
(:mod:`cm3leon.model.cm3`). Each token carries the loss weight for *predicting* it: 0 for
``<bos>`` and CM3 sentinels, ``retrieved_loss_weight`` inside retrieved documents (CM3Leon uses
the query's weight, 1), 1 elsewhere. If a sequence is longer than the model's context,
neighbors are dropped from the front; a query document that alone does not fit is an error.

Randomness is keyed by ``(seed, sample number)`` — separately for the CM3 masks and the
neighbor count — so a sample is the same whatever the process count or a resume point, each
epoch draws a document's masks, paraphrase and neighbor count afresh, and the query side of an
evaluation sequence (keyed by the document index) is identical with or without retrieval.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cm3leon.config import PretrainConfig
from cm3leon.model.cm3 import cm3_mask_spans
from cm3leon.tokenizers.vocab import Vocab


@dataclass(frozen=True)
class TokenDocument:
    """A document's token ids: every caption paraphrase (primary first) and its image."""

    paraphrases: tuple[tuple[int, ...], ...]
    image: tuple[int, ...]


@dataclass
class TrainingSequence:
    ids: list[int]
    weights: list[float]  # weight for predicting ids[j]
    query_start: int  # index of the query document's first token
    # image cell of ids[j] (1..tokens per image; 0: not an image token) where the model cannot
    # count it from the ids (CM3 moved spans); None: the model counts runs of image ids
    cells: list[int] | None = None


@dataclass
class Batch:
    """Model inputs and targets, padded: ``inputs``/``targets``/``weights`` are ``(B, T)``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    query: torch.Tensor  # (B, T) bool: the target belongs to the query document
    cells: torch.Tensor | None = None  # (B, T) image cell of each input (TrainingSequence.cells)
    # (B, T) bool: the input is a real token, not right padding; None: no padding
    real: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int((self.weights > 0).sum())


class RetrievalAugmentedSequences:
    """Builds sequences for documents given their neighbors in a memory bank."""

    def __init__(
        self,
        documents: Sequence[TokenDocument],
        neighbors: Sequence[Sequence[int]],
        bank: Sequence[TokenDocument],
        vocab: Vocab,
        config: PretrainConfig,
        max_seq_len: int,
        seed: int,
    ) -> None:
        if len(documents) != len(neighbors):
            raise ValueError(f"{len(documents)} documents but {len(neighbors)} neighbor lists")
        self.documents, self.neighbors, self.bank = documents, neighbors, bank
        self.vocab, self.config, self.max_seq_len, self.seed = vocab, config, max_seq_len, seed

    def __len__(self) -> int:
        return len(self.documents)

    def build(
        self, index: int, k: int | None = None, augment: bool = True, sample: int | None = None
    ) -> TrainingSequence:
        """Sequence for document ``index``; ``k`` fixes the neighbor count (evaluation).
        ``sample``: the global sample number (:func:`sample_numbers`) keying the draws; by
        default the document index (fixed validation sequences)."""
        vocab, config = self.vocab, self.config
        key = index if sample is None else sample
        query_rng = np.random.default_rng([self.seed, 1, key])
        document = self.documents[index]
        caption = self._caption(document, query_rng if augment else None)
        masked = cm3_mask_spans(
            [*caption, vocab.brk, *document.image], vocab, config.cm3, query_rng
        )
        query_ids = [*masked.ids, vocab.eos]
        query_weights = [*masked.loss_weights, 1.0]
        document_cells = _cells(len(caption), len(document.image))
        query_cells = [document_cells[j] if j >= 0 else 0 for j in masked.source] + [0]
        if 1 + len(query_ids) > self.max_seq_len:
            raise ValueError(
                f"document {index} alone needs {1 + len(query_ids)} tokens but the model's "
                f"context is {self.max_seq_len}; raise pretrain.model.max_seq_len"
            )
        available = list(self.neighbors[index])
        if k is None:
            k = self.neighbor_count(key)
        context_ids: list[int] = []
        context_weights: list[float] = []
        context_cells: list[int] = []
        for row in available[: min(k, len(available))]:
            neighbor = self.bank[row]
            caption = neighbor.paraphrases[0]
            ids = [*caption, vocab.brk, *neighbor.image, vocab.eos]
            if 1 + len(context_ids) + len(ids) + len(query_ids) > self.max_seq_len:
                break  # keep the neighbors that fit, best first
            context_ids += ids
            context_weights += [config.retrieved_loss_weight] * len(ids)
            context_cells += [*_cells(len(caption), len(neighbor.image)), 0]
        return TrainingSequence(
            ids=[vocab.bos, *context_ids, *query_ids],
            weights=[0.0, *context_weights, *query_weights],
            query_start=1 + len(context_ids),
            cells=[0, *context_cells, *query_cells],
        )

    def neighbor_count(self, key: int) -> int:
        """``k ~ uniform{0..retrieval_k_max}`` drawn for ``key``: a sample number, or an
        optimizer step when a step's sequences share one count (``train.length_grouping``)."""
        rng = np.random.default_rng([self.seed, 2, key])
        return int(rng.integers(0, self.config.retrieval_k_max + 1))

    def _caption(self, document: TokenDocument, rng: np.random.Generator | None) -> tuple:
        if rng is None or not self.config.paraphrase_augment:
            return document.paraphrases[0]
        return document.paraphrases[int(rng.integers(len(document.paraphrases)))]


def _cells(caption_tokens: int, image_tokens: int) -> list[int]:
    """Cells of ``caption <break> image``: 0 for the caption and break, then 1..image_tokens."""
    return [0] * (caption_tokens + 1) + list(range(1, image_tokens + 1))


def collate(sequences: Sequence[TrainingSequence], pad: int) -> Batch:
    """Shift into (inputs, targets), longest sequence first, padded on the right to the
    longest with weight 0 (``real`` marks the inputs that are not padding). Rows sorted by
    length let the matmuls and attention skip most padding
    (:class:`~cm3leon.model.unpadded.TrimmedGrids`); a batch's loss does not depend on its row
    order. ``cells`` are kept (for the inputs) when every sequence has them."""
    rows = sorted(sequences, key=lambda s: -len(s.ids))  # stable: ties keep their order
    length = len(rows[0].ids) - 1
    ids = np.full((len(rows), length + 1), pad, dtype=np.int64)
    weights = np.zeros((len(rows), length + 1), dtype=np.float32)
    query = np.zeros((len(rows), length), dtype=bool)
    real = np.zeros((len(rows), length), dtype=bool)
    with_cells = all(s.cells is not None for s in rows)
    cells = np.zeros((len(rows), length + 1), dtype=np.int64) if with_cells else None
    for i, s in enumerate(rows):
        n = len(s.ids) - 1
        ids[i, : n + 1] = s.ids
        weights[i, : n + 1] = s.weights
        query[i, max(s.query_start - 1, 0) : n] = True  # targets at positions >= query_start
        real[i, :n] = True
        if cells is not None:
            cells[i, : n + 1] = s.cells
    return Batch(
        inputs=torch.from_numpy(ids[:, :-1].copy()),
        targets=torch.from_numpy(ids[:, 1:].copy()),
        weights=torch.from_numpy(weights[:, 1:].copy()),
        query=torch.from_numpy(query),
        cells=None if cells is None else torch.from_numpy(cells[:, :-1].copy()),
        real=torch.from_numpy(real),
    )


def sample_numbers(
    step: int, micro_step: int, rank: int, world: int, micro_batch: int, accumulation: int
) -> range:
    """Global sample numbers of one micro-batch, the one formula every training stream uses:
    ``n = ((step * accumulation + micro_step) * world + rank) * micro_batch + b``. The samples
    of one optimizer step are the same set for any split of the global batch across processes
    and micro-steps, and a resumed run continues the same stream."""
    first = ((step * accumulation + micro_step) * world + rank) * micro_batch
    return range(first, first + micro_batch)


def sample_indices(
    step: int,
    micro_step: int,
    rank: int,
    world: int,
    micro_batch: int,
    accumulation: int,
    dataset_size: int,
    seed: int,
) -> list[int]:
    """Document indices for one micro-batch (:func:`document_of` its sample numbers)."""
    numbers = sample_numbers(step, micro_step, rank, world, micro_batch, accumulation)
    return [document_of(n, dataset_size, seed) for n in numbers]


def document_of(sample: int, dataset_size: int, seed: int) -> int:
    """The document index of global sample number ``sample``: the samples walk an endless
    stream of epochs, each a seeded permutation of the documents."""
    epoch, position = divmod(sample, dataset_size)
    return int(_permutation(seed, epoch, dataset_size)[position])


@functools.lru_cache(maxsize=2)  # a step spans at most two epochs
def _permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, 3, epoch]).permutation(size)
