"""The index stage's library call end to end on a tiny corpus."""

import hashlib
import shutil
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from cm3leon.config import (
    DataConfig,
    IndexConfig,
    RetrieverConfig,
    RetrieverTrainConfig,
    ShapeWorldConfig,
    TokenizeConfig,
    VQConfig,
    VQTrainConfig,
)
from cm3leon.data.prepare import prepare_corpus
from cm3leon.data.scene_judge import load_judge
from cm3leon.retrieval.dual_encoder import load_dual_encoder
from cm3leon.retrieval.faiss_index import MemoryBankError, load_index, search
from cm3leon.retrieval.memory_bank import build_memory_bank, load_split
from cm3leon.retrieval.search import MemoryBank, context_ids
from cm3leon.tokenizers.corpus_tokenization import tokenize_corpus
from cm3leon.tokenizers.vocab import Vocab

DATA = DataConfig(shapeworld=ShapeWorldConfig(num_images=120))
TOKENIZE = TokenizeConfig(
    text_vocab_size=300,
    vq=VQConfig(codebook_size=32, code_dim=8, channels=(16, 16)),
    train=VQTrainConfig(steps=5, batch_size=8),
)
INDEX = IndexConfig(
    encoder=RetrieverConfig(
        embed_dim=16, text_width=32, text_layers=1, text_heads=2, image_channels=(8, 16, 16)
    ),
    train=RetrieverTrainConfig(steps=30, batch_size=32, warmup_steps=5, log_every=10),
    eval_queries=20,
)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    prepare_corpus(DATA, 2, root / "corpus")
    tokenize_corpus(root / "corpus", DATA, TOKENIZE, 2, root / "vq", root / "text", root / "tokens")
    logs = []
    metrics = build_memory_bank(
        root / "corpus",
        root / "tokens",
        DATA,
        INDEX,
        2,
        root / "retriever",
        root / "retrieval",
        on_log=lambda s, m: logs.append(m["loss"]),
        judge=load_judge(root / "corpus"),
    )
    return root, metrics, logs


def test_outputs_and_metrics(built):
    root, metrics, logs = built
    assert logs and logs[-1] < logs[0]
    for key in ("text_to_image_recall@1", "image_to_text_recall@5", "attribute_precision@5"):
        assert 0.0 <= metrics[key] <= 1.0
    bank = pq.read_table(root / "retrieval/bank.parquet").column("id").to_pylist()
    assert metrics["bank_size"] == len(bank)
    index = load_index(root / "retrieval/index.faiss")
    assert index.ntotal == len(bank) and index.d == 16


def test_neighbor_table_follows_the_policy(built):
    root, _, _ = built
    table = pq.read_table(root / "retrieval/neighbors.parquet").to_pylist()
    bank = set(pq.read_table(root / "retrieval/bank.parquet").column("id").to_pylist())
    assert {r["split"] for r in table} == {"train", "val"}
    for row in table:
        assert len(row["neighbor_ids"]) <= INDEX.policy.k
        assert row["id"] not in row["neighbor_ids"]  # never itself
        assert set(row["neighbor_ids"]) <= bank  # only memory-bank documents
        assert all(s <= INDEX.policy.relevance_threshold + 1e-6 for s in row["neighbor_scores"])
        assert row["neighbor_scores"] == sorted(row["neighbor_scores"], reverse=True)


def test_same_seed_gives_identical_neighbors_and_a_checkpoint_can_be_reused(built, tmp_path):
    root, _, _ = built
    again = replace(INDEX, retriever_checkpoint=str(root / "retriever"))
    logs = []
    build_memory_bank(
        root / "corpus",
        root / "tokens",
        DATA,
        again,
        2,
        tmp_path / "retriever",
        tmp_path / "retrieval",
        on_log=lambda s, m: logs.append(s),
    )
    assert logs == []  # loaded, not trained
    for name in ("neighbors.parquet", "bank.parquet"):
        assert digest(tmp_path / "retrieval" / name) == digest(root / "retrieval" / name)


def test_embeddings_query_the_index(built):
    root, _, _ = built
    model, _ = load_dual_encoder(root / "retriever")
    vocab = Vocab.load(root / "tokens")
    docs = load_split(root / "corpus", root / "tokens", vocab, "train")
    queries = model.embed_document(docs.captions[:5], docs.images[:5])
    assert np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    _, rows = search(load_index(root / "retrieval/index.faiss"), queries, 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]  # each train document finds itself first
    with pytest.raises(ValueError, match="retriever expects"):
        model.embed_image(np.zeros((1, 16, 16, 3), np.uint8))


def test_retriever_checkpoint_must_fit_the_tokens(built, tmp_path):
    root, _, _ = built
    other = replace(DATA, image_size=16, shapeworld=ShapeWorldConfig(num_images=120))
    config = replace(INDEX, retriever_checkpoint=str(root / "retriever"))
    with pytest.raises(ValueError, match="retriever checkpoint expects"):
        build_memory_bank(
            root / "corpus", root / "tokens", other, config, 2, tmp_path / "r", tmp_path / "b"
        )


def test_generation_time_retrieval_follows_the_policy_with_provenance(built):
    root, _, _ = built
    bank = MemoryBank.load(root / "retriever", root / "retrieval", root / "tokens")
    vocab = Vocab.load(root / "tokens")
    docs = load_split(root / "corpus", root / "tokens", vocab, "test")
    captions = [vocab.text_to_vocab(c) for c in docs.captions[:4]]
    for k in (1, 2):
        results = bank.retrieve_text(captions, k)
        assert len(results) == 4
        for found in results:
            assert 1 <= len(found) <= k
            assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
            for d in found:
                assert d.id in bank.documents and d.provenance()["caption"] == d.caption
                assert vocab.brk in d.ids and vocab.is_image(d.ids[-1])
    assert bank.retrieve_image(docs.images[:3], 0) == [[], [], []]
    by_image = bank.retrieve_image(docs.images[:3], 2)
    assert all(len(found) >= 1 for found in by_image)
    assert context_ids(by_image[0], vocab.eos).count(vocab.eos) == len(by_image[0])


def test_memory_bank_refuses_tokens_of_another_vocab(built, tmp_path):
    root, _, _ = built
    other = tmp_path / "tokens"
    shutil.copytree(root / "tokens", other)
    Vocab(text_size=301, image_size=32).save(other)
    with pytest.raises(MemoryBankError, match="rerun the index stage"):
        MemoryBank.load(root / "retriever", root / "retrieval", other)
