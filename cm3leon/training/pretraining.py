"""Retrieval-augmented CM3 pretraining (the ``pretrain`` stage's library half, DESIGN.md §7).

Reads the tokens and the index stage's neighbor table, builds the decoder-only transformer of the
configured preset, trains it through DeepSpeed with the CM3 objective on sequences that carry
each document's retrieved neighbors (:mod:`cm3leon.training.sequences`), and exports the final
model folder: safetensors weights + ``config.json`` (transformer shape, Vocab layout, the
fingerprints of the tokens it was trained on) + ``vocab.json``.

Resumable checkpoints live under ``scratch_root/<run key>/``, the key hashing every input that
shapes the run (params, seed, tokens and neighbor-table contents, the training code:
:mod:`cm3leon.training.run_key`). A killed run resumes there; a changed input or code gets a
new key and never resumes a stale checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from cm3leon.config import PretrainConfig, TrainConfig
from cm3leon.model.transformer import DecoderLM, TransformerShape
from cm3leon.tokenizers.tokens import check_tokens, read_split
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.training.deepspeed_setup import init_distributed
from cm3leon.training.export import export_trained
from cm3leon.training.loop import LogCallback, train
from cm3leon.training.run_key import run_key
from cm3leon.training.sequences import (
    Batch,
    RetrievalAugmentedSequences,
    TokenDocument,
    TrainingSequence,
    collate,
    document_of,
    sample_numbers,
)


def load_documents(tokens_dir: str | Path, split: str) -> tuple[list[str], list[TokenDocument]]:
    table = read_split(tokens_dir, split).select(["id", "paraphrase_ids", "image_ids"])
    ids = table.column("id").to_pylist()
    documents = [
        TokenDocument(tuple(tuple(p) for p in paraphrases), tuple(image))
        for paraphrases, image in zip(
            table.column("paraphrase_ids").to_pylist(),
            table.column("image_ids").to_pylist(),
            strict=True,
        )
    ]
    return ids, documents


def load_neighbors(
    retrieval_dir: str | Path, ids: list[str], bank_ids: list[str]
) -> list[list[int]]:
    """Bank rows of each document's neighbors, in the order the policy chose them."""
    table = pq.read_table(Path(retrieval_dir) / "neighbors.parquet", columns=["id", "neighbor_ids"])
    by_id = dict(
        zip(table.column("id").to_pylist(), table.column("neighbor_ids").to_pylist(), strict=True)
    )
    row_of = {doc_id: row for row, doc_id in enumerate(bank_ids)}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(
            f"{retrieval_dir}/neighbors.parquet has no entry for {len(missing)} documents "
            f"(e.g. {missing[:3]}): the index stage ran on other tokens; rerun it"
        )
    return [[row_of[n] for n in by_id[i]] for i in ids]


def equal_compute_baseline(
    tokens_dir: str | Path,
    retrieval_dir: str | Path,
    config: PretrainConfig,
    seed: int,
    world: int = 1,
    probe: int = 4096,
) -> PretrainConfig:
    """The no-retrieval baseline of the retrieval study at *equal compute*: ``config`` with
    ``retrieval_k_max = 0``, a micro-batch of as many more documents as it takes for a step to
    hold the retrieval-augmented run's training tokens per step, and the steps (about the same
    number) that make the totals equal. Both runs then see the same tokens, in about the same
    optimizer steps of the same size on the same schedule; a baseline given more steps of
    fewer tokens each would also get more updates. The retrieval-augmented run's tokens are
    counted over its whole stream (``world`` processes; deterministic: a sample is a pure
    function of the seed and its number), the baseline's per sample on the first ``probe``
    samples of its own stream, so the ratio follows the data, the retrieval params and the
    per-step neighbor counts of ``train.length_grouping``; warmup stays as configured."""
    baseline = dataclasses.replace(config, retrieval_k_max=0)
    max_seq_len = config.model.shape()["max_seq_len"]
    per_step = step_samples(config.train, world)
    grouped = per_step if config.train.length_grouping else None
    counts = []
    for setting, samples in ((config, config.train.steps * per_step), (baseline, probe)):
        _, train, _ = load_sequences(tokens_dir, retrieval_dir, setting, seed, max_seq_len)
        built = (train_sample(train, n, seed, grouped) for n in range(samples))
        counts.append(sum(sum(w > 0 for w in s.weights) for s in built) / samples)
    ratio = counts[0] / max(counts[1], 1e-9)  # tokens per sample, retrieval vs baseline
    micro = max(1, round(config.train.micro_batch_size * ratio))
    train = dataclasses.replace(config.train, micro_batch_size=micro)
    total = config.train.steps * per_step * counts[0]  # the retrieval run's training tokens
    steps = max(1, round(total / (step_samples(train, world) * max(counts[1], 1e-9))))
    return dataclasses.replace(baseline, train=dataclasses.replace(train, steps=steps))


def step_samples(train_config: TrainConfig, world: int) -> int:
    """Samples per optimizer step: micro-batch x processes x accumulation."""
    return train_config.micro_batch_size * world * train_config.gradient_accumulation_steps


def train_sample(
    sequences: RetrievalAugmentedSequences, n: int, seed: int, per_step: int | None = None
) -> TrainingSequence:
    """Global training sample number ``n`` of a pretraining run (:func:`document_of`).

    ``per_step``: the samples per optimizer step (:func:`step_samples`) when
    ``train.length_grouping`` draws one neighbor count per step; ``None`` draws it per sample.
    Either way the count of a sample is a pure function of the seed and ``n``."""
    k = None if per_step is None else sequences.neighbor_count(n // per_step)
    return sequences.build(document_of(n, len(sequences), seed), k=k, sample=n)


def load_sequences(tokens_dir, retrieval_dir, config: PretrainConfig, seed: int, max_seq_len: int):
    """``(vocab, train, val)`` retrieval-augmented sequences over the train split's bank."""
    vocab = Vocab.load(tokens_dir)
    bank = pq.read_table(Path(retrieval_dir) / "bank.parquet").column("id").to_pylist()
    train_ids, train_docs = load_documents(tokens_dir, "train")
    if bank != train_ids:
        raise ValueError(
            f"{retrieval_dir} indexes other train documents than {tokens_dir}; rerun index"
        )
    val_ids, val_docs = load_documents(tokens_dir, "val")
    built = [
        RetrievalAugmentedSequences(
            docs,
            load_neighbors(retrieval_dir, ids, bank),
            train_docs,
            vocab,
            config,
            max_seq_len,
            seed + offset,
        )
        for offset, (ids, docs) in enumerate(((train_ids, train_docs), (val_ids, val_docs)))
    ]
    return vocab, built[0], built[1]


def training_batches(
    sequences: RetrievalAugmentedSequences, train_config: TrainConfig, seed: int, world: int
) -> Callable[[int, int, int, int], Batch]:
    """The pretraining run's ``batch_for(step, micro, rank, world)``
    (:func:`~cm3leon.training.loop.train`): the samples :func:`sample_numbers` deals that
    micro-batch, built by :func:`train_sample` and collated."""
    size, accumulation = train_config.micro_batch_size, train_config.gradient_accumulation_steps
    grouped = step_samples(train_config, world) if train_config.length_grouping else None

    def batch_for(step: int, micro: int, rank: int, world: int) -> Batch:
        numbers = sample_numbers(step, micro, rank, world, size, accumulation)
        return collate(
            [train_sample(sequences, n, seed, grouped) for n in numbers], sequences.vocab.pad
        )

    return batch_for


def pretrain(
    tokens_dir: str | Path,
    retrieval_dir: str | Path,
    config: PretrainConfig,
    seed: int,
    out_dir: str | Path,
    scratch_root: str | Path,
    on_log: LogCallback | None = None,
    code: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Train and export; returns run facts (key, parameters, shape). Call on every rank.

    ``code``: the stage script(s) that called this; their import closure and this module's
    are part of the run key (:mod:`cm3leon.training.run_key`)."""
    process = init_distributed()
    device = process.device
    vocab = Vocab.load(tokens_dir)
    tokens_manifest = check_tokens(tokens_dir, vocab)
    shape = TransformerShape.from_config(
        config.model, vocab.size, vocab.image_offset, tokens_manifest["image_tokens"]
    )
    _, train_sequences, val_sequences = load_sequences(
        tokens_dir, retrieval_dir, config, seed, shape.max_seq_len
    )
    train_config = config.train
    batch_for = training_batches(train_sequences, train_config, seed, process.world)
    validation = {"val": _validation_batches(val_sequences, config, train_config)}
    torch.manual_seed(seed)
    model = DecoderLM(shape).to(device)
    key = run_key(config, seed, (tokens_dir, retrieval_dir), (__file__, *code))
    checkpoints = Path(scratch_root) / key
    desc = "pretrain" if config.retrieval_k_max else "pretrain (no retrieval)"
    trained = train(
        model, batch_for, validation, vocab, train_config, checkpoints, process, on_log, desc
    )
    meta = {
        "stage": "pretrain",
        "tokens_vocab_fingerprint": tokens_manifest["vocab_fingerprint"],
        "tokens_vq_fingerprint": tokens_manifest["vq_fingerprint"],
        "retrieval_k_max": config.retrieval_k_max,
        "run_key": key,
    }
    export_trained(trained, train_config.zero_stage, shape, vocab, out_dir, meta, process)
    return {"run_key": key, "parameters": trained.num_parameters(), "shape": shape.to_dict()}


def _validation_batches(
    sequences: RetrievalAugmentedSequences, config: PretrainConfig, train_config
):
    """Fixed val batches: every sequence with all ``retrieval_k_max`` neighbors, no augmentation."""
    count = min(len(sequences), train_config.eval_batches * train_config.micro_batch_size)
    built = [sequences.build(i, k=config.retrieval_k_max, augment=False) for i in range(count)]
    size = train_config.micro_batch_size
    return [collate(built[i : i + size], sequences.vocab.pad) for i in range(0, count, size)]
