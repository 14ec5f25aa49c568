"""Image infilling, scored on any data (CM3's causal-masked objective, CM3Leon §2.3).

For each test document ``caption <break> image`` the middle half of its image tokens is
masked (one contiguous span, as CM3 masks) and the model regenerates it with both sides in
view: the prompt is ``<bos> caption <break> first tokens <mask:0> last tokens <mask:0>`` and the
model writes exactly the masked image ids (:meth:`MultimodalModel.infill_many`). In the default
raster token order the span is the middle rows of the code grid (rows 2-5 of 8); in another
order (``tokenize.vq.token_order``) it is whatever cells those sequence positions hold (for a
Hilbert curve on 8x8, the bottom half), and the pixel region scored below follows it. The
result is compared with the true image:

- ``similarity_dual_encoder``: cosine similarity of the dual encoder's image embeddings of the
  infilled and the true image (mean, 95% interval);
- ``region_mse``: mean squared pixel error over the masked region (pixels in [0, 1]);
- both again for a *spliced* baseline (``spliced_*``), the true image with its masked region
  taken from another test image (a fixed seeded pairing): what an infill that ignores the
  context scores. A model that uses the caption and the visible rows beats it;
- with a scene judge, ``accuracy``: the infilled image read by the parser is exactly the true
  scene (95% Wilson interval); ``spliced_accuracy`` for the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cm3leon.data.scene_judge import SceneJudge
from cm3leon.data.shapeworld_parser import compare_scene
from cm3leon.decoding.selector import Strategy
from cm3leon.evaluation.metrics import mean_interval, row_cosines, wilson_interval
from cm3leon.inference.multimodal import MultimodalModel
from cm3leon.tokenizers.vq import VQModel


def masked_rows(grid: int) -> tuple[int, int]:
    """``(first, end)`` rows of a ``grid`` x ``grid`` code image that are masked: the middle
    half (at least one row)."""
    count = max(grid // 2, 1)
    first = (grid - count) // 2
    return first, first + count


def masked_region(vq: VQModel, grid: int, first: int, end: int, size: int) -> np.ndarray:
    """``(size, size)`` bool: the pixels of the codes at image-sequence positions
    ``first * grid .. end * grid`` (in the tokenizer's token order; the middle rows in raster
    order)."""
    positions = np.zeros(grid * grid, dtype=np.int64)
    positions[first * grid : end * grid] = 1
    cells = vq.to_grid(torch.from_numpy(positions)[None])[0].numpy().astype(bool)
    scale = size // grid
    return np.kron(cells, np.ones((scale, scale), dtype=bool))


def infilling_metrics(
    model: MultimodalModel,
    documents: Sequence[dict],
    strategy: Strategy,
    judge: SceneJudge | None,
    seed: int,
    truth_key: str = "objects",
) -> tuple[dict[str, Any], list[dict]]:
    """Infill the middle rows of every document's image; ``documents`` carry ``caption``,
    ``image_ids`` (Vocab ids) and ``pixels``. Returns ``(metrics, records)``."""
    if len(documents) < 2:
        raise ValueError("infilling needs at least 2 test documents (one is the baseline's)")
    grid = round(model.codec.image_tokens**0.5)
    first, end = masked_rows(grid)
    docs, spans = [], []
    for d in documents:  # caption <break> image, as the codec writes documents
        ids = model.codec.encode(d["caption"], model.vocab.vocab_to_image(d["image_ids"]))
        start = len(ids) - model.codec.image_tokens + first * grid
        docs.append(ids)
        spans.append((start, start + (end - first) * grid))
    filled = model.infill_many(docs, spans, strategy, seed=seed)
    codes = [model.codec.decode(f)[1] for f in filled]
    images = model.decode_ids([model.vocab.image_to_vocab(c) for c in codes])
    truth = np.stack([d["pixels"] for d in documents])

    rng = np.random.default_rng([seed, 0x1F11])
    other = (np.arange(len(documents)) + rng.integers(1, len(documents), len(documents))) % len(
        documents
    )  # never the document itself
    region = masked_region(model.vq, grid, first, end, truth.shape[1])  # (H, W) bool
    spliced = truth.copy()
    spliced[:, region] = truth[other][:, region]

    def region_mse(images: np.ndarray) -> np.ndarray:
        diff = (images[:, region].astype(np.float64) - truth[:, region].astype(np.float64)) / 255
        return (diff**2).reshape(len(images), -1).mean(axis=1)

    metrics: dict[str, Any] = {
        "examples": len(documents),
        "masked_rows": [first, end],  # of the token sequence's grid-row-sized blocks
        "masked_pixel_fraction": float(region.mean()),
    }
    for prefix, candidate in (("", images), ("spliced_", spliced)):
        mse = region_mse(candidate)
        metrics[f"{prefix}region_mse"] = float(mse.mean())
        metrics[f"{prefix}region_mse_ci95"] = mean_interval(mse, bounds=None)
    if model.retriever is not None:
        true_emb = model.retriever.embed_image(truth)
        for prefix, candidate in (("", images), ("spliced_", spliced)):
            similarity = row_cosines(model.retriever.embed_image(candidate), true_emb)
            metrics[f"{prefix}similarity_dual_encoder"] = float(similarity.mean())
            metrics[f"{prefix}similarity_dual_encoder_ci95"] = mean_interval(
                similarity, bounds=None
            )
    records = [
        {"image_id": d.get("id"), "image": image}
        for d, image in zip(documents, images, strict=True)
    ]
    if judge is not None:
        for prefix, candidate in (("", images), ("spliced_", spliced)):
            exact = [
                bool(compare_scene(judge.truth(d[truth_key]), judge.parse(image)).exact)
                for d, image in zip(documents, candidate, strict=True)
            ]
            metrics[f"{prefix}accuracy"] = float(np.mean(exact))
            metrics[f"{prefix}accuracy_ci95"] = wilson_interval(sum(exact), len(exact))
            if not prefix:
                for record, right in zip(records, exact, strict=True):
                    record["correct"] = right
    return metrics, records
