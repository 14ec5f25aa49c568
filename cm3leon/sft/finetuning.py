"""Multi-task supervised fine-tuning from the pretrained model (the ``sft`` stage, CM3Leon §4).

Examples come from the tokens artifact, one list per task of the registry
(:mod:`cm3leon.tasks`): text-to-image and captioning from the documents, VQA, editing,
grounding and segmentation from the tokenized task tables, each rendered with its
instruction template (:mod:`cm3leon.tokenizers.templates`) and preceded by ``<bos>``. A task belongs
to the split of the image it is about. Training samples draw a task by the mixing weights and
then an example (:mod:`cm3leon.sft.mixing`; with ``train.length_grouping`` a step first draws
tasks of one image count), keyed by the global sample number, and go through
the same DeepSpeed loop, resume and export as pretraining (:mod:`cm3leon.training.loop`).

Validation reports loss per task on its val examples — before fine-tuning (the pretrained
model, logged at step 0 as ``pretrain_val_<task>/…``) and during it (``val_<task>/…``);
``query_loss`` there is the loss on the output part of each example.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon.config import SFTConfig
from cm3leon.model.io import load_decoder
from cm3leon.sft.mixing import mixture
from cm3leon.tasks import TASKS
from cm3leon.tokenizers.document import DocumentCodec
from cm3leon.tokenizers.templates import phrasing_for, render
from cm3leon.tokenizers.text import load_text_tokenizer
from cm3leon.tokenizers.tokens import check_tokens, read_split, read_task_tokens
from cm3leon.training.deepspeed_setup import init_distributed
from cm3leon.training.export import export_trained
from cm3leon.training.loop import LogCallback, evaluate, train
from cm3leon.training.run_key import run_key
from cm3leon.training.sequences import TrainingSequence, collate, sample_numbers

log = logging.getLogger(__name__)


def build_examples(
    tokens_dir, codec: DocumentCodec, config: SFTConfig
) -> dict[str, dict[str, list]]:
    """``{split: {task: [TrainingSequence]}}`` for train and val, every task of the registry;
    with ``config.null_condition_fraction > 0`` also ``"train_null"``: each guidable task's
    train examples (:attr:`TaskSpec.guidable`) with the prompt's text masked, index for index."""
    documents = {s: read_split(tokens_dir, s).to_pylist() for s in ("train", "val")}
    split_of = {d["id"]: s for s, docs in documents.items() for d in docs}
    image_of = {d["id"]: d["image_ids"] for docs in documents.values() for d in docs}
    rows: dict[str, list[tuple[str, dict, dict]]] = {t: [] for t in TASKS}
    for name, spec in TASKS.items():
        if spec.table is None:  # the documents themselves
            for split, docs in documents.items():
                for d in docs:
                    rows[name].append(
                        (split, {f: d[f] for f in spec.texts}, {"image": d["image_ids"]})
                    )
            continue
        for r in read_task_tokens(tokens_dir, spec.table).to_pylist():
            split = split_of.get(r["image_id"])
            if split is None:
                continue  # test-split images are kept for evaluation
            images = {"image": image_of[r["image_id"]]}
            if spec.image is not None:
                images[spec.image.slot] = r[spec.image.tokens_column]
            rows[name].append((split, {f: r[f] for f in spec.texts}, images))
    out: dict[str, dict[str, list]] = {
        "train": {t: [] for t in TASKS},
        "val": {t: [] for t in TASKS},
    }
    if config.null_condition_fraction > 0:
        out["train_null"] = {t: [] for t, spec in TASKS.items() if spec.guidable}
    for task, items in rows.items():
        phrasing = phrasing_for(task, config.phrasing)
        for split, texts, images in items:
            masked = (False, True) if task in out.get(f"{split}_null", {}) else (False,)
            for mask_text in masked:
                example = render(
                    task, phrasing, texts, images, codec, config.loss_on_output_only, mask_text
                )
                out[f"{split}_null" if mask_text else split][task].append(
                    TrainingSequence(
                        ids=[codec.vocab.bos, *example.ids],
                        weights=[0.0, *example.weights],
                        query_start=1 + example.output_start,
                    )
                )
    return out


def finetune(
    pretrain_dir: str | Path,
    tokens_dir: str | Path,
    text_dir: str | Path,
    config: SFTConfig,
    seed: int,
    out_dir: str | Path,
    scratch_root: str | Path,
    on_log: LogCallback | None = None,
    code: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Fine-tune and export; returns run facts. Call on every rank. ``code``: the calling stage
    script(s), part of the run key with this module (:mod:`cm3leon.training.run_key`)."""
    process = init_distributed()
    rank, device = process.rank, process.device
    model, vocab, meta, _ = load_decoder(pretrain_dir)
    manifest = check_tokens(tokens_dir, vocab)
    codec = DocumentCodec(vocab, load_text_tokenizer(text_dir), manifest["image_tokens"])
    examples = build_examples(tokens_dir, codec, config)
    longest = max(
        len(s.ids) for split in examples.values() for seqs in split.values() for s in seqs
    )
    if longest > model.shape.max_seq_len:
        raise ValueError(
            f"an SFT example has {longest} tokens; the model's context is {model.shape.max_seq_len}"
        )
    train_config = config.train
    missing = [t for t in TASKS if not examples["train"][t]]
    if missing:  # user data without task files: said here, in the metrics and in the report
        log.warning("no train examples for %s: these tasks are not trained", ", ".join(missing))
    groups = {t: spec.image_count for t, spec in TASKS.items()}
    mix = mixture(
        {t: len(examples["train"][t]) for t in TASKS},
        config.mixing,
        groups if train_config.length_grouping else None,
    )

    size, accumulation = train_config.micro_batch_size, train_config.gradient_accumulation_steps

    null = examples.get("train_null", {})

    def pick(n: int, group: int | None) -> TrainingSequence:
        task, i = mix.sample(n, seed, group)
        if task in null and np.random.default_rng([seed, 7, n]).random() < (
            config.null_condition_fraction
        ):
            return null[task][i]
        return examples["train"][task][i]

    def batch_for(step: int, micro: int, rank: int, world: int):
        numbers = sample_numbers(step, micro, rank, world, size, accumulation)
        group = mix.group_of(step, seed)
        return collate([pick(n, group) for n in numbers], vocab.pad)

    validation = {}
    for task, seqs in examples["val"].items():
        seqs = seqs[: train_config.eval_batches * size]
        if seqs:
            validation[f"val_{task}"] = [
                collate(seqs[i : i + size], vocab.pad) for i in range(0, len(seqs), size)
            ]
    model = model.to(device)
    if rank == 0 and on_log is not None:
        for name, batches in validation.items():
            metrics = evaluate(model, batches, vocab, device)
            on_log(0, {f"pretrain_{name}/{k}": v for k, v in metrics.items()})
    key = run_key(config, seed, (tokens_dir, pretrain_dir), (__file__, *code))
    checkpoints = Path(scratch_root) / key
    trained = train(
        model, batch_for, validation, vocab, train_config, checkpoints, process, on_log, "sft"
    )
    export_meta = {
        "stage": "sft",
        "tokens_vocab_fingerprint": manifest["vocab_fingerprint"],
        "tokens_vq_fingerprint": manifest["vq_fingerprint"],
        "pretrain_run_key": meta.get("run_key"),
        "sft_config": asdict(config),
        "run_key": key,
    }
    shape = model.shape
    export_trained(trained, train_config.zero_stage, shape, vocab, out_dir, export_meta, process)
    return {
        "run_key": key,
        "examples": {s: {t: len(v) for t, v in d.items()} for s, d in examples.items()},
        "tasks_not_trained": missing,
    }
