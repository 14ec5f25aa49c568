"""Build the memory bank and every document's neighbors (the ``index`` stage's library half).

1. the dual encoder: trained on the train split (tokens' caption paraphrases + corpus pixels)
   or loaded from ``index.retriever_checkpoint``;
2. the memory bank: every train document's embedding (normalized mean of text and image), in
   a faiss index of the configured type, with ``bank.parquet`` mapping index rows to ids;
3. the neighbor table: for every train and val document, its ``k`` neighbors chosen by the
   retrieval policy from the index's candidates for its query-dropped embedding;
4. retrieval quality on the test split: text->image and image->text recall@1/5/10 among test
   documents, and — when the corpus has a scene judge (ShapeWorld) — attribute precision@5:
   the share of the top-5 bank images retrieved for a held-out caption that the judge reads as
   exactly the caption's scene.

Layout of ``data/retrieval/``: ``index.faiss``, ``bank.parquet`` (row, id),
``neighbors.parquet`` (id, split, neighbor_ids, neighbor_scores), ``manifest.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cm3leon.artifacts import atomic_dir, atomic_write_json
from cm3leon.config import DataConfig, IndexConfig
from cm3leon.data.corpus import decode_images, read_documents
from cm3leon.data.scene_judge import SceneJudge
from cm3leon.data.shapeworld import scene_from_json
from cm3leon.retrieval.dual_encoder import (
    DualEncoder,
    combine,
    load_dual_encoder,
    save_dual_encoder,
)
from cm3leon.retrieval.faiss_index import INDEX_FILE, build_index, save_index, search
from cm3leon.retrieval.policy import drop_image_patches, drop_text_tokens, select_neighbors
from cm3leon.retrieval.training import train_dual_encoder
from cm3leon.shards import SERIAL, ShardExecutor, map_rows
from cm3leon.tokenizers.tokens import check_tokens, read_split
from cm3leon.tokenizers.vocab import Vocab

NEIGHBOR_SPLITS = ("train", "val")
NEIGHBORS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("neighbor_ids", pa.list_(pa.string())),
        ("neighbor_scores", pa.list_(pa.float32())),
    ]
)


@dataclass
class SplitDocuments:
    ids: list[str]
    captions: list[list[int]]  # primary caption, BPE-local ids
    paraphrases: list[list[list[int]]]
    images: np.ndarray  # (N, H, W, 3) uint8
    objects: list[str | None]


def load_split(corpus_dir, tokens_dir, vocab: Vocab, split: str) -> SplitDocuments:
    tokens = read_split(tokens_dir, split)
    corpus = read_documents(corpus_dir, ["id", "image", "height", "width"], split=split)
    ids = tokens.column("id").to_pylist()
    if ids != corpus.column("id").to_pylist():
        raise ValueError(
            f"{tokens_dir} and {corpus_dir} list different {split} documents: the tokens were "
            "made from another corpus; rerun tokenize"
        )
    return SplitDocuments(
        ids=ids,
        captions=[vocab.vocab_to_text(c) for c in tokens.column("caption_ids").to_pylist()],
        paraphrases=[
            [vocab.vocab_to_text(p) for p in ps]
            for ps in tokens.column("paraphrase_ids").to_pylist()
        ],
        images=decode_images(corpus) if corpus.num_rows else np.zeros((0, 0, 0, 3), np.uint8),
        objects=tokens.column("objects").to_pylist(),
    )


def build_memory_bank(
    corpus_dir: str | Path,
    tokens_dir: str | Path,
    data_config: DataConfig,
    config: IndexConfig,
    seed: int,
    retriever_dir: str | Path,
    retrieval_dir: str | Path,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    executor: ShardExecutor = SERIAL,
    judge: SceneJudge | None = None,
) -> dict[str, Any]:
    """Run the index stage: writes ``retriever_dir`` and ``retrieval_dir``, returns metrics.
    ``judge``: the corpus's scene judge, for the attribute precision of retrieved images.

    Every embedding (bank, neighbor queries, test metrics) runs in shards on ``executor``; the
    artifacts are byte-identical whichever executor runs it (:mod:`cm3leon.shards`).
    """
    vocab = Vocab.load(tokens_dir)
    tokens_manifest = check_tokens(tokens_dir, vocab)
    splits = {s: load_split(corpus_dir, tokens_dir, vocab, s) for s in ("train", "val", "test")}
    bank_docs = splits["train"]
    if config.retriever_checkpoint is not None:
        model, _ = load_dual_encoder(config.retriever_checkpoint)
        _check_retriever(model, vocab, data_config)
    else:
        model = train_dual_encoder(
            bank_docs.paraphrases,
            bank_docs.images,
            config.encoder,
            config.train,
            vocab.text_size,
            seed,
            on_log,
        )
    fingerprint = save_dual_encoder(model, retriever_dir)

    embed = Embedder(model, config.embed_batch_size, executor)
    bank_text = embed.text(bank_docs.captions, "embed bank text")
    bank_image = embed.image(bank_docs.images, "embed bank images")
    bank = combine(bank_text, bank_image)
    index = build_index(
        bank, config.factory, seed=seed, nprobe=config.nprobe, ef_search=config.ef_search
    )
    multimodal = np.ones(len(bank), dtype=bool)  # every corpus document has an image and text
    rng = np.random.default_rng([seed, 0x1DE])
    rows = []
    for split in NEIGHBOR_SPLITS:
        docs = splits[split]
        rows += _neighbor_rows(
            embed, docs, split, index, bank, multimodal, config, rng, bank_docs.ids
        )
    with atomic_dir(retrieval_dir) as tmp:
        save_index(index, tmp / INDEX_FILE)
        pq.write_table(
            pa.table({"row": np.arange(len(bank)), "id": bank_docs.ids}), tmp / "bank.parquet"
        )
        pq.write_table(
            pa.Table.from_pylist(rows, schema=NEIGHBORS_SCHEMA), tmp / "neighbors.parquet"
        )
        atomic_write_json(
            tmp / "manifest.json",
            {
                "factory": config.factory,
                "dim": int(bank.shape[1]),
                "bank_size": len(bank),
                "retriever_fingerprint": fingerprint,
                "vocab_fingerprint": tokens_manifest["vocab_fingerprint"],
                "policy": config.policy.__dict__,
            },
        )
    metrics = _retrieval_metrics(embed, splits, bank_image, bank_docs, judge, config, rng)
    metrics["bank_size"] = len(bank)
    metrics["mean_neighbors"] = (
        float(np.mean([len(r["neighbor_ids"]) for r in rows])) if rows else 0.0
    )
    scores = [s for r in rows for s in r["neighbor_scores"]]
    metrics["mean_neighbor_score"] = float(np.mean(scores)) if scores else 0.0
    return metrics


@dataclass(frozen=True)
class Embedder:
    """The dual encoder's ``embed_text`` / ``embed_image``, run in shards on an executor."""

    model: DualEncoder
    batch_size: int
    executor: ShardExecutor = SERIAL

    def text(self, texts: Sequence[Sequence[int]], name: str = "embed text") -> np.ndarray:
        fn = partial(DualEncoder.embed_text, self.model, batch_size=self.batch_size)
        return map_rows(name, fn, texts, self.batch_size, self.executor)

    def image(self, images: np.ndarray, name: str = "embed images") -> np.ndarray:
        fn = partial(DualEncoder.embed_image, self.model, batch_size=self.batch_size)
        return map_rows(name, fn, images, self.batch_size, self.executor)

    def document(self, texts, images: np.ndarray, name: str = "embed documents") -> np.ndarray:
        """As :meth:`DualEncoder.embed_document`: the normalized mean of both embeddings."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        return combine(self.text(texts, f"{name} text"), self.image(images, f"{name} images"))


def _check_retriever(model: DualEncoder, vocab: Vocab, data_config: DataConfig) -> None:
    if model.text_vocab_size != vocab.text_size or model.image_size != data_config.image_size:
        raise ValueError(
            f"retriever checkpoint expects {model.text_vocab_size} text tokens and "
            f"{model.image_size}px images, but the tokens have {vocab.text_size} text tokens and "
            f"the corpus {data_config.image_size}px images"
        )


def _neighbor_rows(
    embed: Embedder, docs: SplitDocuments, split, index, bank, multimodal, config, rng, bank_ids
):
    if not docs.ids:
        return []
    policy = config.policy
    texts = [drop_text_tokens(c, policy.query_dropout, rng) for c in docs.captions]
    images = drop_image_patches(docs.images, policy.query_dropout, rng)
    queries = embed.document(texts, images, f"embed {split} queries")
    scores, candidates = search(index, queries, policy.candidates + 1)
    self_rows = {doc_id: row for row, doc_id in enumerate(bank_ids)} if split == "train" else {}
    rows = []
    for i, doc_id in enumerate(docs.ids):
        chosen = select_neighbors(
            candidates[i], scores[i], bank, multimodal, policy, self_row=self_rows.get(doc_id)
        )
        rows.append(
            {
                "id": doc_id,
                "split": split,
                "neighbor_ids": [bank_ids[n.row] for n in chosen],
                "neighbor_scores": [n.score for n in chosen],
            }
        )
    return rows


def _retrieval_metrics(embed, splits, bank_image, bank_docs, judge, config, rng) -> dict:
    test = splits["test"]
    metrics: dict[str, Any] = {}
    if not test.ids:
        return metrics
    text = embed.text(test.captions, "embed test text")
    image = embed.image(test.images, "embed test images")
    keys = [tuple(sorted(map(tuple, p))) for p in test.paraphrases]
    for name, queries, items in (("text_to_image", text, image), ("image_to_text", image, text)):
        ranking = np.argsort(-(queries @ items.T), axis=1, kind="stable")
        for k in (1, 5, 10):
            hits = [any(keys[j] == keys[i] for j in ranking[i, :k]) for i in range(len(keys))]
            metrics[f"{name}_recall@{k}"] = float(np.mean(hits))
    if judge is not None and all(o is not None for o in test.objects):
        metrics.update(_attribute_precision(test, text, bank_image, bank_docs, judge, config, rng))
    return metrics


def _attribute_precision(test, text, bank_image, bank_docs, judge: SceneJudge, config, rng) -> dict:
    """Share of top-5 bank images (text->image) the judge reads as exactly the query's scene."""
    count = min(config.eval_queries, len(test.ids))
    chosen = np.sort(rng.choice(len(test.ids), count, replace=False))
    bank_scenes = [_scene_key(o) for o in bank_docs.objects]
    top = np.argsort(-(text[chosen] @ bank_image.T), axis=1, kind="stable")[:, :5]
    exact, achievable, by_count = [], [], {}
    for q, rows in zip(chosen, top, strict=True):
        truth = judge.truth(test.objects[q])
        hits = [judge.compare(truth, bank_docs.images[r]).exact for r in rows]
        exact.append(np.mean(hits))
        if bank_scenes.count(_scene_key(test.objects[q])) >= 5:
            achievable.append(np.mean(hits))
        by_count.setdefault(len(truth), []).append(np.mean(hits))
    out = {
        "attribute_precision@5": float(np.mean(exact)),
        "attribute_precision@5_queries": len(exact),
        "attribute_precision@5_achievable": float(np.mean(achievable)) if achievable else 0.0,
        "attribute_precision@5_achievable_queries": len(achievable),
    }
    for n, values in sorted(by_count.items()):
        out[f"attribute_precision@5_{n}_objects"] = float(np.mean(values))
    return out


def _scene_key(objects_json: str | None) -> tuple:
    """A scene without jitter: what a caption states."""
    if objects_json is None:
        return ()
    return tuple(
        sorted((o.row, o.col, o.shape, o.color, o.size) for o in scene_from_json(objects_json))
    )
