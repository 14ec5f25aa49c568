"""Turn the corpus into tokens (the ``tokenize`` stage's library half, DESIGN.md §5).

1. VQ image tokenizer: trained on the train split's images (plus, by default, the train split's
   segmentation masks drawn white on black, so SFT's mask targets tokenize well) or loaded
   from ``tokenize.vq_checkpoint``;
2. byte-level BPE trained on every caption paraphrase of the train split;
3. the :class:`~cm3leon.tokenizers.vocab.Vocab` joining both;
4. every document and task row encoded to Vocab ids;
5. reconstruction quality on the val split: PSNR/MSE, codebook usage and perplexity, mask IoU,
   and — when the corpus has a scene judge (ShapeWorld, :mod:`cm3leon.data.scene_judge`) —
   the judge's attribute agreement on reconstructions, the ceiling for every image task
   downstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon.config import DataConfig, TokenizeConfig
from cm3leon.data.corpus import SPLITS, decode_images, read_documents, read_task_table
from cm3leon.data.scene_judge import SceneJudge
from cm3leon.data.shapeworld_parser import (
    agreement_summary,
)
from cm3leon.shards import SERIAL, ShardExecutor, map_rows
from cm3leon.tasks import TABLE_TASKS
from cm3leon.tokenizers.document import DocumentCodec
from cm3leon.tokenizers.text import save_text_tokenizer, train_text_tokenizer
from cm3leon.tokenizers.tokens import write_tokens
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.tokenizers.vq import VQModel
from cm3leon.tokenizers.vq_training import (
    codebook_statistics,
    decode_codes,
    encode_images,
    load_vq,
    mask_iou,
    reconstruction_metrics,
    save_vq,
    train_vq,
)

DOCUMENT_COLUMNS = ["id", "caption", "captions", "image", "height", "width", "objects"]


@dataclass
class TokenizeResult:
    metrics: dict[str, float]
    originals: np.ndarray  # (G, H, W, 3) val images shown in the reconstruction grid
    reconstructions: np.ndarray  # (G, H, W, 3)
    manifest: dict[str, Any]


def tokenize_corpus(
    corpus_dir: str | Path,
    data_config: DataConfig,
    config: TokenizeConfig,
    seed: int,
    vq_dir: str | Path,
    text_dir: str | Path,
    tokens_dir: str | Path,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    executor: ShardExecutor = SERIAL,
    judge: SceneJudge | None = None,
) -> TokenizeResult:
    """Run the whole tokenize stage; writes ``vq_dir``, ``text_dir`` and ``tokens_dir``.
    ``judge``: the corpus's scene judge, for the parser agreement on reconstructions.

    Image encoding (documents, edit targets, masks) runs in shards on ``executor``; the
    artifacts are byte-identical whichever executor runs it (:mod:`cm3leon.shards`).
    """
    docs = {s: read_documents(corpus_dir, DOCUMENT_COLUMNS, split=s) for s in SPLITS}
    images = {s: decode_images(t) if t.num_rows else None for s, t in docs.items()}
    if images["train"] is None:
        raise ValueError(f"{corpus_dir}: the train split is empty; nothing to train tokenizers on")
    split_of = {i: s for s, t in docs.items() for i in t.column("id").to_pylist()}
    masks = _masks_by_split(corpus_dir, split_of, data_config.image_size)

    model = _vq_model(images["train"], masks["train"], config, seed, on_log)
    side = data_config.image_size // model.config.downsample
    if side * model.config.downsample != data_config.image_size:
        raise ValueError(
            f"data.image_size {data_config.image_size} is not a multiple of the VQ downsampling "
            f"factor {model.config.downsample}"
        )
    vq_fingerprint = save_vq(model, vq_dir)

    train_captions = [c for cs in docs["train"].column("captions").to_pylist() for c in cs]
    text_tokenizer = train_text_tokenizer(train_captions, config.text_vocab_size)
    save_text_tokenizer(text_tokenizer, text_dir)
    vocab = Vocab(
        text_size=config.text_vocab_size,
        image_size=model.config.codebook_size,
        num_sentinels=config.num_sentinels,
        num_reserved=config.num_reserved,
    )
    codec = DocumentCodec(vocab, text_tokenizer, image_tokens=side * side)

    encode = partial(_encode, model, config.encode_batch_size, executor)
    codes = {s: encode(images[s], f"encode {s}") for s in SPLITS}
    documents = {s: _document_rows(docs[s], codes[s], codec) for s in SPLITS}
    tasks = _task_rows(corpus_dir, encode, codec, data_config.image_size)
    manifest = write_tokens(
        tokens_dir,
        documents,
        tasks,
        vocab,
        extra={"vq_fingerprint": vq_fingerprint, "grid": [side, side], "image_tokens": side * side},
    )

    eval_split = "val" if images["val"] is not None else "train"
    metrics, reconstructions = _val_metrics(
        model,
        images[eval_split],
        codes[eval_split],
        masks[eval_split],
        docs[eval_split],
        judge,
        config,
        encode,
    )
    metrics["evaluated_on"] = eval_split  # type: ignore[assignment]
    shown = min(config.grid_examples, len(images[eval_split]))
    return TokenizeResult(metrics, images[eval_split][:shown], reconstructions[:shown], manifest)


def _vq_model(train_images, train_masks, config: TokenizeConfig, seed: int, on_log) -> VQModel:
    if config.vq_checkpoint is not None:
        model, _ = load_vq(config.vq_checkpoint)
        return model
    data = train_images
    if config.train.include_masks and train_masks is not None and len(train_masks):
        data = np.concatenate([train_images, _mask_rgb(train_masks)])
    return train_vq(data, config.vq, config.train, seed, on_log)


def _mask_rgb(masks: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` 0/255 masks -> white-on-black ``(N, H, W, 3)`` images."""
    return np.repeat(masks[..., None], 3, axis=-1)


def _masks_by_split(corpus_dir, split_of: dict[str, str], image_size: int) -> dict[str, Any]:
    """The one-channel task images (segmentation masks) of each split, ``(N, H, W)`` or None."""
    pairs = []
    for name, spec in TABLE_TASKS.items():
        if spec.image is not None and spec.image.channels == 1:
            table = read_task_table(corpus_dir, name)
            pairs += zip(
                table.column("image_id").to_pylist(),
                table.column(spec.image.column).to_pylist(),
                strict=True,
            )
    out: dict[str, Any] = {}
    for split in SPLITS:
        raws = [mask for image_id, mask in pairs if split_of.get(image_id) == split]
        out[split] = _stack(raws, (image_size, image_size)) if raws else None
    return out


def _stack(raws: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    """Raw uint8 buffers -> one ``(N, *shape)`` array (``N`` may be 0)."""
    out = np.zeros((len(raws), *shape), dtype=np.uint8)
    for i, raw in enumerate(raws):
        out[i] = np.frombuffer(raw, np.uint8).reshape(shape)
    return out


def _encode(
    model: VQModel, batch_size: int, executor: ShardExecutor, images, desc: str
) -> np.ndarray | None:
    """``(N, H, W, 3)`` images -> ``(N, h*w)`` codes, in shards on ``executor``."""
    if images is None:
        return None
    fn = partial(encode_images, model, batch_size=batch_size, desc=desc)
    return map_rows(desc, fn, images, batch_size, executor)


def _document_rows(table, codes, codec: DocumentCodec) -> list[dict[str, Any]]:
    if codes is None:
        return []
    rows = []
    for i, row in enumerate(table.select(["id", "caption", "captions", "objects"]).to_pylist()):
        captions = [row["caption"]] + [c for c in row["captions"] if c != row["caption"]]
        rows.append(
            {
                "id": row["id"],
                "caption": row["caption"],
                "caption_ids": codec.encode_text(row["caption"]),
                "paraphrase_ids": [codec.encode_text(c) for c in captions],
                "image_ids": codec.encode_image(codes[i].tolist()),
                "objects": row["objects"],
            }
        )
    return rows


def _task_rows(corpus_dir, encode, codec: DocumentCodec, image_size: int):
    """Every task table of the registry tokenized: its text fields as ``<field>_ids``, the image
    it produces (if any) encoded into its tokens column, every other column kept."""
    out = {}
    for name, spec in TABLE_TASKS.items():
        rows = read_task_table(corpus_dir, name).to_pylist()
        field = spec.image
        codes = None
        if field is not None:
            raws = [r[field.column] for r in rows]
            codes = encode(_field_images(raws, field.channels, image_size), f"encode {name}")
        tokenized = []
        for i, r in enumerate(rows):
            row = {k: v for k, v in r.items() if field is None or k != field.column}
            row.update({f"{t}_ids": codec.encode_text(r[t]) for t in spec.texts})
            if field is not None:
                row[field.tokens_column] = codec.encode_image(codes[i].tolist())
            tokenized.append(row)
        out[name] = tokenized
    return out


def _field_images(raws: list[bytes], channels: int, image_size: int) -> np.ndarray:
    """Raw task-table images -> ``(N, H, W, 3)`` for the VQ (one channel: white on black)."""
    shape = (image_size, image_size)
    if channels == 3:
        return _stack(raws, (*shape, 3))
    if channels == 1:
        return _mask_rgb(_stack(raws, shape))
    raise ValueError(f"task images need 1 or 3 channels, not {channels}")


def _val_metrics(
    model, images, codes, masks, table, judge: SceneJudge | None, config: TokenizeConfig, encode
):
    reconstructions = decode_codes(model, codes, config.encode_batch_size)
    metrics: dict[str, Any] = {
        **reconstruction_metrics(images, reconstructions),
        **codebook_statistics(codes, model.config.codebook_size),
        "images": len(images),
    }
    if masks is not None:
        mask_codes = encode(_mask_rgb(masks), "encode val masks")
        metrics["mask_iou"] = mask_iou(
            masks, decode_codes(model, mask_codes, config.encode_batch_size)
        )
    objects = table.column("objects").to_pylist()
    if judge is not None and all(o is not None for o in objects):
        agreement = agreement_summary(
            [
                judge.compare(judge.truth(o), r)
                for o, r in zip(objects, reconstructions, strict=True)
            ]
        )
        metrics.update({f"parser_{k}": v for k, v in agreement.items()})
    return metrics, reconstructions
