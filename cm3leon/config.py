"""Typed configuration: one frozen dataclass per ``params.yaml`` section.

``params.yaml`` is the single source of truth for every tunable value (DESIGN.md §2, STYLE.md
§2-3). Each top-level section maps onto one dataclass below; nested mappings map onto nested
dataclasses. Loading is strict: an unknown or misspelled key raises :class:`ConfigError` naming
the key, where it was found and the valid keys, so a typo never silently falls back to a
default. Values are type-checked against the annotations and range-checked in
``__post_init__``.

Later stages add their own sections here (``tokenize``, ``index``, ...); a section that is
absent from ``params.yaml`` takes its defaults.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from cm3leon import numerics
from cm3leon.decoding_strategies import SAMPLE_PLANS, STRATEGIES
from cm3leon.tasks import TASKS

T = TypeVar("T")


class ConfigError(ValueError):
    """A params file or section is malformed; the message names the key and the problem."""


class RelativeConfigError(ConfigError):
    """Raised by a dataclass that serves several sections (``TrainConfig``) with its key
    relative to the section; :func:`from_mapping` re-raises it with the section's full path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass(frozen=True)
class NumericsConfig:
    """``base.numerics``: which CPU kernels every stage process runs (:mod:`cm3leon.numerics`).

    ``reproducible`` pins MKL, ATen and oneDNN to their AVX2 paths and the thread count to
    ``threads``, so any x86-64 CPU with AVX2 computes the same bytes; ``fast`` lets each library
    take the CPU's widest ISA and every core (hashes then depend on the machine)."""

    mode: Literal["reproducible", "fast"] = numerics.DEFAULT_MODE
    threads: int = numerics.DEFAULT_THREADS

    def __post_init__(self) -> None:
        _check(self.threads >= 1, "base.numerics.threads", "must be >= 1")


@dataclass(frozen=True)
class BaseConfig:
    """``base``: values shared by every stage."""

    seed: int = 1234
    numerics: NumericsConfig = field(default_factory=NumericsConfig)

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**32, "base.seed", "must be in [0, 2**32)")


@dataclass(frozen=True)
class ShapeWorldConfig:
    """``data.shapeworld``: the embedded procedural image-caption corpus (DESIGN.md §4).

    Images are ``data.image_size`` pixels square, divided into a ``grid_size`` x ``grid_size``
    grid; each image holds ``min_objects..max_objects`` objects in distinct cells (each count
    equally likely, or in the proportions ``object_weights`` gives), each drawn with a shape,
    color and size from the lists below and shifted by up to ``position_jitter`` pixels inside
    its cell.
    """

    num_images: int = 6000
    min_objects: int = 1
    max_objects: int = 2
    object_weights: tuple[float, ...] | None = None  # one weight per count min..max; None: equal
    grid_size: int = 3
    shapes: tuple[str, ...] = ("square", "circle", "triangle")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
    sizes: tuple[str, ...] = ("small", "large")
    position_jitter: int = 1
    vqa_per_image: int = 2
    edits_per_image: int = 1

    def __post_init__(self) -> None:
        # Imported lazily: the palette/shape tables live with the renderer that owns them.
        from cm3leon.data.shapeworld import COLORS, GRID_POSITION_NAMES, SHAPES, SIZES

        where = "data.shapeworld"
        _check(self.num_images >= 1, f"{where}.num_images", "must be >= 1")
        _check(self.min_objects >= 1, f"{where}.min_objects", "must be >= 1")
        _check(
            self.max_objects >= self.min_objects,
            f"{where}.max_objects",
            f"must be >= min_objects ({self.min_objects})",
        )
        _check(
            self.grid_size in GRID_POSITION_NAMES,
            f"{where}.grid_size",
            f"must be one of {sorted(GRID_POSITION_NAMES)}",
        )
        _check(
            self.max_objects <= self.grid_size**2,
            f"{where}.max_objects",
            f"cannot exceed the number of grid cells ({self.grid_size**2})",
        )
        for key, values, known in (
            ("shapes", self.shapes, SHAPES),
            ("colors", self.colors, COLORS),
            ("sizes", self.sizes, SIZES),
        ):
            _check(len(values) >= 1, f"{where}.{key}", "must not be empty")
            _check(len(set(values)) == len(values), f"{where}.{key}", "has repeated entries")
            unknown = [v for v in values if v not in known]
            _check(not unknown, f"{where}.{key}", f"unknown {unknown}; known: {sorted(known)}")
        if self.object_weights is not None:
            counts = self.max_objects - self.min_objects + 1
            _check(
                len(self.object_weights) == counts,
                f"{where}.object_weights",
                f"needs one weight per object count {self.min_objects}..{self.max_objects} "
                f"({counts}), got {len(self.object_weights)}",
            )
            _check(
                all(w >= 0 for w in self.object_weights) and sum(self.object_weights) > 0,
                f"{where}.object_weights",
                "weights must be >= 0 with a positive sum",
            )
        _check(0 <= self.position_jitter <= 2, f"{where}.position_jitter", "must be in 0..2")
        _check(self.vqa_per_image >= 0, f"{where}.vqa_per_image", "must be >= 0")
        _check(self.edits_per_image >= 0, f"{where}.edits_per_image", "must be >= 0")


@dataclass(frozen=True)
class ManifestConfig:
    """``data.manifest``: a user's CSV/Parquet/JSONL manifest (columns ``image``, ``caption``,
    optional ``id`` and ``split``). ``root`` is the folder image paths are relative to
    (default: the manifest's folder); no path may escape it."""

    path: str | None = None
    root: str | None = None


@dataclass(frozen=True)
class CocoConfig:
    """``data.coco``: a COCO captions JSON (``images`` + ``annotations``) and its image folder."""

    annotations: str | None = None
    images: str | None = None


@dataclass(frozen=True)
class TaskFilesConfig:
    """``data.tasks``: the user's own instruction-tuning / evaluation examples, each optional
    (a ShapeWorld corpus derives its task tables from the scenes instead). Formats
    (:mod:`cm3leon.data.task_files`): ``vqa`` a VQAv2 questions JSON (with ``vqa_annotations``)
    or a manifest with ``image`` (or ``image_id``), ``question``, ``answer`` or ``answers``;
    ``editing`` a manifest with ``image``, ``instruction``, ``target``; ``segmentation`` a
    manifest with ``image``, ``instruction``, ``mask`` (a PNG, nonzero inside); ``grounding`` a
    COCO instances JSON (boxes), whose prompt lists the ``grounding_max_boxes`` largest boxes.
    Manifest image paths are relative to ``root`` (default: each file's folder)."""

    vqa: str | None = None
    vqa_annotations: str | None = None
    editing: str | None = None
    segmentation: str | None = None
    grounding: str | None = None
    root: str | None = None
    grounding_max_boxes: int = 4

    def __post_init__(self) -> None:
        _check(self.grounding_max_boxes >= 1, "data.tasks.grounding_max_boxes", "must be >= 1")
        if self.vqa is not None and self.vqa.lower().endswith(".json"):
            _check(
                self.vqa_annotations is not None,
                "data.tasks.vqa_annotations",
                "is required when data.tasks.vqa is a VQAv2 questions JSON",
            )

    def files(self) -> dict[str, str]:
        """The task files given, by key (``vqa``, ``vqa_annotations``, ..., ``root``)."""
        keys = ("vqa", "vqa_annotations", "editing", "segmentation", "grounding", "root")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass(frozen=True)
class SplitsConfig:
    """``data.splits``: fractions of unique images per split; they must sum to 1."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"data.splits.{name}", "must be in [0, 1]")
        total = self.train + self.val + self.test
        _check(abs(total - 1.0) < 1e-6, "data.splits", f"fractions must sum to 1 (got {total})")

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


@dataclass(frozen=True)
class DataConfig:
    """``data``: where the corpus comes from and how it is shaped (the ``prepare`` stage)."""

    source: Literal["shapeworld", "manifest", "coco"] = "shapeworld"
    image_size: int = 32
    shard_size: int = 4096
    on_invalid: Literal["fail", "quarantine"] = "fail"
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    shapeworld: ShapeWorldConfig = field(default_factory=ShapeWorldConfig)
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    coco: CocoConfig = field(default_factory=CocoConfig)
    tasks: TaskFilesConfig = field(default_factory=TaskFilesConfig)

    def __post_init__(self) -> None:
        _check(8 <= self.image_size <= 1024, "data.image_size", "must be in [8, 1024]")
        _check(self.shard_size >= 1, "data.shard_size", "must be >= 1")
        if self.source == "manifest":
            _check(self.manifest.path is not None, "data.manifest.path", "is required")
        if self.source == "coco":
            _check(self.coco.annotations is not None, "data.coco.annotations", "is required")
            _check(self.coco.images is not None, "data.coco.images", "is required")
        if self.source == "shapeworld":
            given = [k for k in self.tasks.files() if k != "root"]
            _check(
                not given,
                f"data.tasks.{given[0] if given else ''}",
                "is for user data: a ShapeWorld corpus derives its task tables from its scenes",
            )


@dataclass(frozen=True)
class ValidateConfig:
    """``validate``: bounds for the great_expectations gate on the corpus."""

    caption_min_chars: int = 1
    caption_max_chars: int = 512
    check_split_proportions: bool = True
    split_tolerance: float = 0.02
    sample_failures: int = 10

    def __post_init__(self) -> None:
        _check(self.caption_min_chars >= 1, "validate.caption_min_chars", "must be >= 1")
        _check(
            self.caption_max_chars >= self.caption_min_chars,
            "validate.caption_max_chars",
            "must be >= caption_min_chars",
        )
        _check(0.0 <= self.split_tolerance <= 1.0, "validate.split_tolerance", "must be in [0, 1]")
        _check(self.sample_failures >= 1, "validate.sample_failures", "must be >= 1")


@dataclass(frozen=True)
class VQConfig:
    """``tokenize.vq``: architecture of the VQ image tokenizer (stored with its weights)."""

    codebook_size: int = 256
    code_dim: int = 16
    channels: tuple[int, ...] = (32, 64)  # width after the stem, then one entry per 2x downsample
    num_res_blocks: int = 1
    ema_decay: float = 0.99
    commitment: float = 0.25
    restart_threshold: float = 0.5  # EMA usage count under which a code is restarted
    # The order in which a code grid becomes a token sequence (cm3leon.tokenizers.vq):
    # "raster" (row by row) or "hilbert" (a Hilbert curve: each 2x2, 4x4, ... block contiguous)
    token_order: Literal["raster", "hilbert"] = "raster"

    def __post_init__(self) -> None:
        where = "tokenize.vq"
        _check(self.codebook_size >= 2, f"{where}.codebook_size", "must be >= 2")
        _check(self.code_dim >= 1, f"{where}.code_dim", "must be >= 1")
        _check(len(self.channels) >= 1, f"{where}.channels", "needs at least one width")
        _check(
            all(c >= 8 and c % 8 == 0 for c in self.channels),
            f"{where}.channels",
            "widths must be multiples of 8 (GroupNorm uses 8 groups)",
        )
        _check(self.num_res_blocks >= 0, f"{where}.num_res_blocks", "must be >= 0")
        _check(0.0 < self.ema_decay < 1.0, f"{where}.ema_decay", "must be in (0, 1)")
        _check(self.commitment >= 0, f"{where}.commitment", "must be >= 0")
        _check(self.restart_threshold >= 0, f"{where}.restart_threshold", "must be >= 0")

    @property
    def downsample(self) -> int:
        """Image side / code-grid side."""
        return 2 ** len(self.channels)


@dataclass(frozen=True)
class VQTrainConfig:
    """``tokenize.train``: how the VQ tokenizer is trained on the train split."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 0.002
    warmup_steps: int = 50
    include_masks: bool = True  # also train on segmentation masks so SFT targets tokenize well
    log_every: int = 50

    def __post_init__(self) -> None:
        where = "tokenize.train"
        _check(self.steps >= 1, f"{where}.steps", "must be >= 1")
        _check(self.batch_size >= 1, f"{where}.batch_size", "must be >= 1")
        _check(self.lr > 0, f"{where}.lr", "must be > 0")
        _check(self.warmup_steps >= 0, f"{where}.warmup_steps", "must be >= 0")
        _check(self.log_every >= 1, f"{where}.log_every", "must be >= 1")


@dataclass(frozen=True)
class TokenizeConfig:
    """``tokenize``: VQ image tokenizer, BPE text tokenizer and the shared vocabulary."""

    vq_checkpoint: str | None = None  # a models/vq folder to load instead of training
    text_vocab_size: int = 512
    num_sentinels: int = 16  # CM3 sentinels <mask:0..N-1>; >= the max spans per document
    num_reserved: int = 16  # reserved special slots SFT names as task separators
    encode_batch_size: int = 256
    grid_examples: int = 16  # originals/reconstructions in the grid PNG
    vq: VQConfig = field(default_factory=VQConfig)
    train: VQTrainConfig = field(default_factory=VQTrainConfig)

    def __post_init__(self) -> None:
        _check(self.text_vocab_size >= 256, "tokenize.text_vocab_size", "must be >= 256")
        _check(self.num_sentinels >= 1, "tokenize.num_sentinels", "must be >= 1")
        _check(self.num_reserved >= 0, "tokenize.num_reserved", "must be >= 0")
        _check(self.encode_batch_size >= 1, "tokenize.encode_batch_size", "must be >= 1")
        _check(self.grid_examples >= 1, "tokenize.grid_examples", "must be >= 1")


@dataclass(frozen=True)
class RetrieverConfig:
    """``index.encoder``: the CLIP-style dual encoder's shape."""

    embed_dim: int = 64  # shared embedding space
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_text_tokens: int = 64
    image_channels: tuple[int, ...] = (32, 64, 128)  # one 2x downsample per entry

    def __post_init__(self) -> None:
        where = "index.encoder"
        for key in ("embed_dim", "text_width", "text_layers", "text_heads", "max_text_tokens"):
            _check(getattr(self, key) >= 1, f"{where}.{key}", "must be >= 1")
        _check(
            self.text_width % self.text_heads == 0,
            f"{where}.text_width",
            "must be divisible by text_heads",
        )
        _check(len(self.image_channels) >= 1, f"{where}.image_channels", "needs a width")
        _check(
            all(c % 8 == 0 for c in self.image_channels),
            f"{where}.image_channels",
            "widths must be multiples of 8 (GroupNorm uses 8 groups)",
        )


@dataclass(frozen=True)
class RetrieverTrainConfig:
    """``index.train``: contrastive training of the dual encoder on the train split."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 0.001
    warmup_steps: int = 50
    log_every: int = 25

    def __post_init__(self) -> None:
        where = "index.train"
        _check(self.steps >= 1, f"{where}.steps", "must be >= 1")
        _check(self.batch_size >= 2, f"{where}.batch_size", "must be >= 2 (contrastive)")
        _check(self.lr > 0, f"{where}.lr", "must be > 0")
        _check(self.warmup_steps >= 0, f"{where}.warmup_steps", "must be >= 0")
        _check(self.log_every >= 1, f"{where}.log_every", "must be >= 1")


@dataclass(frozen=True)
class RetrievalPolicyConfig:
    """``index.policy``: CM3Leon's retrieval policy (Yu et al. 2023 §2.2, after RA-CM3)."""

    k: int = 2  # neighbors per query
    relevance_threshold: float = 0.9  # skip candidates at least this similar (near-duplicates)
    duplicate_threshold: float = 0.9  # skip candidates this similar to an already chosen one
    prefer_multimodal: bool = True  # rank image+text documents before single-modality ones
    query_dropout: float = 0.2  # share of query tokens (text) / patches (image) dropped
    candidates: int = 32  # faiss candidates the policy chooses from

    def __post_init__(self) -> None:
        where = "index.policy"
        _check(self.k >= 0, f"{where}.k", "must be >= 0")
        _check(-1 <= self.relevance_threshold <= 1, f"{where}.relevance_threshold", "in [-1, 1]")
        _check(-1 <= self.duplicate_threshold <= 1, f"{where}.duplicate_threshold", "in [-1, 1]")
        _check(0 <= self.query_dropout < 1, f"{where}.query_dropout", "must be in [0, 1)")
        _check(self.candidates >= self.k, f"{where}.candidates", "must be >= k")


@dataclass(frozen=True)
class IndexConfig:
    """``index``: dual encoder, faiss memory bank and neighbor table (the ``index`` stage)."""

    retriever_checkpoint: str | None = None  # a models/retriever folder to load instead
    factory: str = "Flat"  # faiss index-factory string, e.g. "IVF256,Flat", "HNSW32"
    nprobe: int = 16  # IVF indexes: inverted lists visited per query
    ef_search: int = 64  # HNSW indexes: search breadth
    embed_batch_size: int = 512
    eval_queries: int = 500  # held-out captions scored for attribute precision@5
    encoder: RetrieverConfig = field(default_factory=RetrieverConfig)
    train: RetrieverTrainConfig = field(default_factory=RetrieverTrainConfig)
    policy: RetrievalPolicyConfig = field(default_factory=RetrievalPolicyConfig)

    def __post_init__(self) -> None:
        _check(bool(self.factory.strip()), "index.factory", "must be a faiss factory string")
        _check(self.nprobe >= 1, "index.nprobe", "must be >= 1")
        _check(self.ef_search >= 1, "index.ef_search", "must be >= 1")
        _check(self.embed_batch_size >= 1, "index.embed_batch_size", "must be >= 1")
        _check(self.eval_queries >= 1, "index.eval_queries", "must be >= 1")


# Transformer shapes (STYLE.md §13: presets are data). `tiny` is for tests, `default` for the
# 2-core CPU run, `cpu256` the CPU run's earlier, wider shape, `gpu` the GPU profile's (README);
# the others are the paper's shapes (Yu et al. 2023, Table 3), for GPU users. `default` is
# 3 x 128 with 8 heads of 16: at the CPU run's compute 4 x 128 beats 4 x 256, 8 heads beat 4,
# and 3 layers x 2,400 steps beat 4 x 1,800 at equal FLOPs (issue 14's tables in README).
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 384},
    "default": {"n_layer": 4, "n_head": 8, "d_model": 112, "max_seq_len": 384},
    "cpu256": {"n_layer": 4, "n_head": 4, "d_model": 256, "max_seq_len": 384},
    "gpu": {"n_layer": 8, "n_head": 8, "d_model": 512, "max_seq_len": 384},
    "350m": {"n_layer": 24, "n_head": 16, "d_model": 1024, "max_seq_len": 4096},
    "760m": {"n_layer": 24, "n_head": 24, "d_model": 1536, "max_seq_len": 4096},
    "7b": {"n_layer": 32, "n_head": 32, "d_model": 4096, "max_seq_len": 4096},
}


@dataclass(frozen=True)
class ModelConfig:
    """``pretrain.model``: a preset, optionally overridden field by field."""

    preset: str = "default"
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    max_seq_len: int | None = None
    init_std: float = 0.006  # truncated-normal init, as in the paper
    image_positions: bool = False  # + a learned embedding of each image token's cell
    rotary: bool = False  # + rotary position embedding (RoPE) of queries and keys

    def __post_init__(self) -> None:
        _check(
            self.preset in MODEL_PRESETS,
            "pretrain.model.preset",
            f"unknown preset {self.preset!r}; known: {list(MODEL_PRESETS)}",
        )
        shape = self.shape()
        for key in ("n_layer", "n_head", "d_model", "max_seq_len"):
            _check(shape[key] >= 1, f"pretrain.model.{key}", "must be >= 1")
        _check(
            shape["d_model"] % shape["n_head"] == 0,
            "pretrain.model.d_model",
            f"must be divisible by n_head ({shape['n_head']})",
        )
        _check(self.init_std > 0, "pretrain.model.init_std", "must be > 0")

    def shape(self) -> dict[str, int]:
        """The preset with this config's overrides applied."""
        shape = dict(MODEL_PRESETS[self.preset])
        for key in shape:
            value = getattr(self, key)
            if value is not None:
                shape[key] = value
        return shape


@dataclass(frozen=True)
class CM3Config:
    """``pretrain.cm3``: the causal-masked objective (Aghajanyan et al. 2022, CM3Leon §2.3)."""

    poisson_lambda: float = 1.0  # spans per document ~ clamp(Poisson(lambda), min, max)
    min_spans: int = 1
    max_spans: int = 16
    max_span_length: int = 16  # span length ~ uniform[1, min(max_span_length, segment length)]
    unmasked_fraction: float = 0.1  # share of documents left as plain left-to-right text
    null_condition_fraction: float = 0.0  # share of masked documents whose caption is span 0

    def __post_init__(self) -> None:
        where = "pretrain.cm3"
        _check(self.poisson_lambda >= 0, f"{where}.poisson_lambda", "must be >= 0")
        _check(self.min_spans >= 0, f"{where}.min_spans", "must be >= 0")
        _check(self.max_spans >= self.min_spans, f"{where}.max_spans", "must be >= min_spans")
        _check(self.max_span_length >= 1, f"{where}.max_span_length", "must be >= 1")
        _check(0 <= self.unmasked_fraction <= 1, f"{where}.unmasked_fraction", "must be in [0, 1]")
        _check(
            0 <= self.null_condition_fraction <= 1,
            f"{where}.null_condition_fraction",
            "must be in [0, 1]",
        )


@dataclass(frozen=True)
class TrainConfig:
    """``pretrain.train`` / ``sft.train``: the DeepSpeed training loop (DESIGN.md §7)."""

    steps: int = 1000  # optimizer steps
    micro_batch_size: int = 16  # sequences per process per forward
    gradient_accumulation_steps: int = 1
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0..3 (0: one process has nothing to partition)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    lr: float = 0.003
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, ...] = (0.9, 0.98)  # AdamW, as in the paper
    # adamw: every parameter on AdamW (the paper's). muon: the transformer blocks' matrices on
    # Muon at muon_lr (cm3leon/training/optimizers.py), embeddings and head on AdamW at lr;
    # needs zero_stage 0 and fp32 (precision auto trains fp32 on a GPU too)
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100  # resumable checkpoints in the scratch folder
    # Every sequence of an optimizer step comes from one length group, so a batch pads little:
    # pretraining draws the neighbor count once per step, SFT the image count of its tasks.
    # The marginal distribution of samples is unchanged (README, Pretraining).
    length_grouping: bool = False

    def __post_init__(self) -> None:
        # One dataclass serves two sections, so its keys are relative: from_mapping prefixes
        # the section it was read from (sft.train.steps), see RelativeConfigError.
        check = _check_relative
        for key in ("steps", "micro_batch_size", "gradient_accumulation_steps", "log_every"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("eval_every", "eval_batches", "checkpoint_every"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        check(self.lr > 0, "lr", "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(len(self.betas) == 2, "betas", "must be two numbers")
        check(self.grad_clip > 0, "grad_clip", "must be > 0")
        check(self.muon_lr > 0, "muon_lr", "must be > 0")
        check(0 <= self.muon_momentum < 1, "muon_momentum", "must be in [0, 1)")
        if self.optimizer == "muon":
            # ZeRO and DeepSpeed's bf16 optimizer hand the optimizer flat 1-D partitions
            check(self.zero_stage == 0, "zero_stage", "must be 0 with optimizer muon")
            check(self.precision != "bf16", "precision", "must be fp32 or auto with optimizer muon")


@dataclass(frozen=True)
class PretrainConfig:
    """``pretrain``: retrieval-augmented CM3 pretraining (Yu et al. 2023 §2)."""

    retrieval_k_max: int = 2  # neighbors per document ~ uniform{0..K}; 0 = no retrieval
    retrieved_loss_weight: float = 1.0  # CM3Leon: the same weight as the query document
    paraphrase_augment: bool = True  # draw a caption paraphrase per sample
    model: ModelConfig = field(default_factory=ModelConfig)
    cm3: CM3Config = field(default_factory=CM3Config)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(self.retrieval_k_max >= 0, "pretrain.retrieval_k_max", "must be >= 0")
        _check(self.retrieved_loss_weight >= 0, "pretrain.retrieved_loss_weight", "must be >= 0")


@dataclass(frozen=True)
class SFTConfig:
    """``sft``: multi-task instruction tuning from the pretrained model (CM3Leon §4)."""

    phrasing: int = 0  # which phrasing of every task's template (cm3leon/tasks.py)
    loss_on_output_only: bool = False  # CM3Leon: loss on the whole sequence
    # Relative sampling weight of each task of the registry (CM3Leon §4 up/down-sampling); a
    # task not named gets 1.0, an unknown name is an error naming the known tasks.
    mixing: dict[str, float] = field(default_factory=dict)
    # Share of the samples of each task decoded with classifier-free guidance (an image output
    # from a prompt with text) whose prompt text is ``<mask:0>``: fine-tuning keeps training the
    # unconditional stream pretraining's ``cm3.null_condition_fraction`` trained.
    null_condition_fraction: float = 0.0
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=600, lr=0.001, warmup_steps=20, eval_every=100)
    )

    def __post_init__(self) -> None:
        _check(self.phrasing >= 0, "sft.phrasing", "must be >= 0")
        _check(
            0 <= self.null_condition_fraction <= 1,
            "sft.null_condition_fraction",
            "must be in [0, 1]",
        )
        for name in self.mixing:
            _check(name in TASKS, f"sft.mixing.{name}", f"unknown task; known: {list(TASKS)}")
        mixing = {t: float(self.mixing.get(t, 1.0)) for t in TASKS}  # registry order
        for key, value in mixing.items():
            _check(value >= 0, f"sft.mixing.{key}", "must be >= 0")
        _check(sum(mixing.values()) > 0, "sft.mixing", "at least one weight must be > 0")
        object.__setattr__(self, "mixing", mixing)


@dataclass(frozen=True)
class DecodingConfig:
    """``evaluate.decoding``: the strategy behind the headline numbers (CM3Leon §3).

    ``strategy``: a sample plan of :mod:`cm3leon.decoding_strategies` — top_p | cd_k | greedy
    | mix (samples alternate top-p and CD-K, then the dual encoder re-ranks them) — for
    text-to-image (:attr:`cm3leon.tasks.TaskSpec.reranked`); ``samples`` per prompt. The
    other values are what the strategies' processors read (``Strategy.from_config``).
    ``answer_strategy`` (one sample) serves tasks with a single right output: VQA, editing,
    grounding and segmentation (and captioning's first caption). ``answer_cfg_weight``: its CFG
    weight for the tasks that draw an image from a prompt holding text
    (:attr:`cm3leon.tasks.TaskSpec.guidable`: editing, grounding, segmentation; SFT trains
    their unconditional stream); text answers are decoded unguided.
    ``rerank_caption_weight``: the weight ``w`` of ``log p(prompt | sample)`` under the SFT
    model added to the dual encoder's logit when image samples are re-ranked
    (:meth:`cm3leon.inference.multimodal.MultimodalModel.rerank_scores`); 0 re-ranks by the
    dual encoder alone, as the paper by CLIP.
    ``caption_samples``: captions drawn per image — the ``answer_strategy`` one first, then
    top-p ones at ``caption_top_p`` (temperature 1) — and, when more than one, re-ranked by
    ``log p(image | caption)`` under the captioning model itself
    (:meth:`cm3leon.inference.multimodal.MultimodalModel.image_log_likelihood`); 1 keeps the
    single answer sample.
    """

    strategy: str = "top_p"
    cfg_weight: float = 1.0
    temperature: float = 1.0
    top_p: float = 0.9
    cd_alpha: float = 0.1
    cd_k: int = 5
    samples: int = 4
    answer_strategy: str = "greedy"
    answer_cfg_weight: float = 1.0
    rerank_caption_weight: float = 0.0
    caption_samples: int = 1
    caption_top_p: float = 0.9

    def __post_init__(self) -> None:
        where = "evaluate.decoding"
        plans, single = list(SAMPLE_PLANS), list(STRATEGIES)
        _check(self.strategy in SAMPLE_PLANS, f"{where}.strategy", f"must be one of {plans}")
        _check(self.answer_strategy in STRATEGIES, f"{where}.answer_strategy", f"in {single}")
        _check(self.cfg_weight >= 0, f"{where}.cfg_weight", "must be >= 0")
        _check(self.answer_cfg_weight >= 0, f"{where}.answer_cfg_weight", "must be >= 0")
        _check(self.temperature > 0, f"{where}.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, f"{where}.top_p", "must be in (0, 1]")
        _check(0 <= self.cd_alpha <= 1, f"{where}.cd_alpha", "must be in [0, 1]")
        _check(self.cd_k >= 1, f"{where}.cd_k", "must be >= 1")
        _check(self.samples >= 1, f"{where}.samples", "must be >= 1")
        _check(self.rerank_caption_weight >= 0, f"{where}.rerank_caption_weight", "must be >= 0")
        _check(self.caption_samples >= 1, f"{where}.caption_samples", "must be >= 1")
        _check(0 < self.caption_top_p <= 1, f"{where}.caption_top_p", "must be in (0, 1]")


@dataclass(frozen=True)
class StudiesConfig:
    """``evaluate.studies``: the paper's ablations in miniature, on ``prompts`` test prompts."""

    prompts: int = 100
    cfg_weights: tuple[float, ...] = (1.0, 1.5, 3.0, 5.0, 7.0)
    strategies: tuple[str, ...] = ("top_p", "cd_k", "mix")
    samples: tuple[int, ...] = (1, 2, 4, 8)
    retrieved: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        where = "evaluate.studies"
        _check(self.prompts >= 1, f"{where}.prompts", "must be >= 1")
        _check(all(w >= 0 for w in self.cfg_weights), f"{where}.cfg_weights", "must be >= 0")
        plans = list(SAMPLE_PLANS)
        _check(all(s in plans for s in self.strategies), f"{where}.strategies", f"in {plans}")
        _check(all(n >= 1 for n in self.samples), f"{where}.samples", "must be >= 1")
        _check(all(k >= 0 for k in self.retrieved), f"{where}.retrieved", "must be >= 0")


@dataclass(frozen=True)
class EvaluateConfig:
    """``evaluate``: test-split evaluation of the pretrain and SFT models (DESIGN.md §10)."""

    prompts: int = 200  # test captions for text-to-image (all when larger)
    task_examples: int = 200  # test examples per other task
    retrieved: int = 2  # memory-bank documents prepended for the (RA-trained) pretrain model
    sft_retrieved: int = 0  # ... for the SFT model (SFT trains without retrieved documents)
    batch_size: int = 256  # rows (streams x samples) per generation batch
    max_text_tokens: int = 48
    phrasing: int = 0  # template phrasing used to prompt (as in sft.phrasing)
    grid_examples: int = 8  # prompts shown in each sample grid
    inception_weights: str | None = None  # local torchvision Inception-v3 state dict for FID
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    studies: StudiesConfig = field(default_factory=StudiesConfig)

    def __post_init__(self) -> None:
        for key in ("prompts", "task_examples", "batch_size", "max_text_tokens", "grid_examples"):
            _check(getattr(self, key) >= 1, f"evaluate.{key}", "must be >= 1")
        for key in ("retrieved", "sft_retrieved", "phrasing"):
            _check(getattr(self, key) >= 0, f"evaluate.{key}", "must be >= 0")


@dataclass(frozen=True)
class FlowConfig:
    """``flow``: how the Prefect flow runs each DVC stage."""

    retries: int = 1
    retry_delay_seconds: float = 5.0
    stage_timeout_seconds: float = 7200.0

    def __post_init__(self) -> None:
        _check(self.retries >= 0, "flow.retries", "must be >= 0")
        _check(self.retry_delay_seconds >= 0, "flow.retry_delay_seconds", "must be >= 0")
        _check(self.stage_timeout_seconds > 0, "flow.stage_timeout_seconds", "must be > 0")


# GTO's rule for artifact and stage names (lower case, digits, inner hyphens).
REGISTRY_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


@dataclass(frozen=True)
class RegistryConfig:
    """``registry``: which models get a GTO version and stage (``cm3leon register``, the
    flow's ``register``; :mod:`cm3leon.lineage.registry`). A model declared under ``artifacts:``
    in ``dvc.yaml`` gets a version when the metric its ``meta.gate`` names (``FILE:key``, a path
    so it lives in dvc.yaml) is at least ``gates[name]``; a declared model without a minimum
    here is an error, not an ungated registration. Not a stage's param: changing a gate reruns
    nothing."""

    stage: str = "candidate"  # the GTO stage each new version is assigned
    gates: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(REGISTRY_NAME.match(self.stage)), "registry.stage", "lower case, digits, -")
        for name in self.gates:
            _check(bool(REGISTRY_NAME.match(name)), f"registry.gates.{name}", "not a GTO name")


@dataclass(frozen=True)
class Params:
    """All of ``params.yaml``."""

    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raises :class:`ConfigError` naming the bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"params file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"params file {path} is not valid YAML: {err}") from err
    if raw is None:
        raw = {}
    try:
        return from_mapping(Params, raw, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def from_mapping(cls: type[T], mapping: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    label = where or "top level"
    if not isinstance(mapping, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(mapping).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(
            f"unknown key '{name}' in {label}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {
        key: _coerce(hints[key], value, f"{where}.{key}" if where else key)
        for key, value in mapping.items()
    }
    try:
        return cls(**values)
    except RelativeConfigError as err:
        key = f"{where}.{err.key}" if where else err.key
        raise ConfigError(f"{key}: {err.message}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value if value is not None else {}, where)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, item_type = get_args(tp)
        return {
            _coerce(key_type, k, where): _coerce(item_type, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, _ellipsis) = get_args(tp)
        return tuple(_coerce(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # a bug in this module


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _check_relative(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise RelativeConfigError(key, message)
