"""Retrieval at generation time: a prompt's documents from the memory bank, with provenance.

:class:`MemoryBank` joins the index stage's artifacts (``data/retrieval``: faiss index,
``bank.parquet`` row -> id, the policy it used) with the retriever (``models/retriever``) and the
bank documents' tokens (``data/tokens``, train split). A text prompt is embedded with the text
tower, an image with the image tower; faiss returns candidates and the retrieval policy of
training picks ``k``, less its two training-only rules: no query dropout, and no relevance
threshold (which keeps near-duplicates of a *training* document, the answer it would copy, out
of its context; a prompt's best matches are what generation wants: see
:mod:`cm3leon.retrieval.policy`). Every result carries the document id,
caption and score, so a generation can say which memory-bank documents it used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from cm3leon.config import RetrievalPolicyConfig
from cm3leon.retrieval.dual_encoder import DualEncoder, load_dual_encoder
from cm3leon.retrieval.faiss_index import INDEX_FILE, MemoryBankError, load_index, search
from cm3leon.retrieval.policy import select_neighbors
from cm3leon.tokenizers.tokens import read_split
from cm3leon.tokenizers.vocab import Vocab


@dataclass(frozen=True)
class RetrievedDocument:
    id: str
    caption: str
    score: float
    ids: tuple[int, ...]  # the document in Vocab ids: caption <break> image

    def provenance(self) -> dict:
        return {"id": self.id, "caption": self.caption, "score": round(self.score, 6)}


class MemoryBank:
    def __init__(
        self,
        retriever: DualEncoder,
        index,
        bank_ids: list[str],
        documents: dict[str, tuple[str, tuple[int, ...]]],
        policy: RetrievalPolicyConfig,
        vocab: Vocab,
    ) -> None:
        self.retriever, self.index, self.bank_ids = retriever, index, bank_ids
        self.documents, self.policy, self.vocab = documents, policy, vocab
        self._bank = _bank_vectors(index)  # (N, D) for the policy's duplicate check
        self._multimodal = np.ones(len(bank_ids), dtype=bool)

    @classmethod
    def load(
        cls, retriever_dir: str | Path, retrieval_dir: str | Path, tokens_dir: str | Path
    ) -> MemoryBank:
        retrieval_dir = Path(retrieval_dir)
        manifest_path = retrieval_dir / "manifest.json"
        if not manifest_path.is_file():
            raise MemoryBankError(f"{manifest_path} not found: run the index stage first")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        retriever, fingerprint = load_dual_encoder(retriever_dir)
        if manifest["retriever_fingerprint"] != fingerprint:
            raise MemoryBankError(
                f"{retrieval_dir} was built with retriever {manifest['retriever_fingerprint']} "
                f"but {retriever_dir} is {fingerprint}; rerun the index stage"
            )
        vocab = Vocab.load(tokens_dir)
        if manifest["vocab_fingerprint"] != vocab.fingerprint:
            raise MemoryBankError(
                f"{retrieval_dir} indexes tokens of vocab {manifest['vocab_fingerprint']}, but "
                f"{tokens_dir} has {vocab.fingerprint}; rerun the index stage"
            )
        index = load_index(retrieval_dir / INDEX_FILE)
        bank_ids = pq.read_table(retrieval_dir / "bank.parquet").column("id").to_pylist()
        table = read_split(tokens_dir, "train").select(
            ["id", "caption", "caption_ids", "image_ids"]
        )
        documents = {
            doc_id: (caption, (*caption_ids, vocab.brk, *image_ids))
            for doc_id, caption, caption_ids, image_ids in zip(
                *(table.column(c).to_pylist() for c in table.column_names), strict=True
            )
        }
        missing = [i for i in bank_ids if i not in documents]
        if missing:
            raise MemoryBankError(
                f"{len(missing)} bank documents (e.g. {missing[0]!r}) are not in {tokens_dir}"
            )
        policy = RetrievalPolicyConfig(**manifest["policy"])
        return cls(retriever, index, bank_ids, documents, policy, vocab)

    def retrieve_text(
        self, captions: Sequence[Sequence[int]], k: int
    ) -> list[list[RetrievedDocument]]:
        """Documents for text prompts given as Vocab text ids."""
        local = [self.vocab.vocab_to_text(c) for c in captions]
        return self._retrieve(self.retriever.embed_text(local), k)

    def retrieve_image(self, images: np.ndarray, k: int) -> list[list[RetrievedDocument]]:
        """Documents for ``(N, H, W, 3)`` uint8 image prompts."""
        return self._retrieve(self.retriever.embed_image(images), k)

    def _retrieve(self, queries: np.ndarray, k: int) -> list[list[RetrievedDocument]]:
        if k == 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        policy = RetrievalPolicyConfig(
            **{**self.policy.__dict__, "k": k, "candidates": max(self.policy.candidates, k)}
        )
        scores, rows = search(self.index, queries, policy.candidates)
        out = []
        for row_candidates, row_scores in zip(rows, scores, strict=True):
            chosen = select_neighbors(
                row_candidates,
                row_scores,
                self._bank,
                self._multimodal,
                policy,
                skip_near_duplicates=False,
            )
            out.append(
                [
                    RetrievedDocument(
                        self.bank_ids[n.row],
                        self.documents[self.bank_ids[n.row]][0],
                        n.score,
                        self.documents[self.bank_ids[n.row]][1],
                    )
                    for n in chosen
                ]
            )
        return out


def context_ids(documents: Sequence[RetrievedDocument], eos: int) -> list[int]:
    """Retrieved documents as a prompt prefix: each document followed by ``<eos>``."""
    return [t for d in documents for t in (*d.ids, eos)]


def _bank_vectors(index) -> np.ndarray:
    """The stored vectors of any index type (IVF indexes need a direct map first)."""
    try:
        return index.reconstruct_n(0, index.ntotal)
    except RuntimeError:
        faiss.extract_index_ivf(index).make_direct_map()
        return index.reconstruct_n(0, index.ntotal)
