"""Decoder-only transformer with CM3Leon's architecture defaults (Yu et al. 2023, §2.3; DESIGN §7).

The paper's choices, all on by default and not switchable (STYLE.md §10):

* no bias terms anywhere, no dropout;
* LayerNorm without learnable parameters (``elementwise_affine=False``), pre-norm blocks and a
  final norm before the output head;
* learned absolute position embeddings;
* optionally (``image_cells > 0``, ``pretrain.model.image_positions``) a learned embedding of
  each image token's *cell* in its image (1 .. ``image_cells``, the place in the image's token
  sequence, i.e. in the tokenizer's ``token_order``), added to the
  absolute position. This is this project's addition, in the spirit of LlamaGen's 2D RoPE: with
  absolute positions alone an image cell's index shifts with the caption's length and the
  retrieved documents before it. Cells come from the ids (the token's place in its run of
  image ids; the cache carries each row's run) unless the caller passes the true ``cells``
  (CM3-masked training sequences, whose moved spans would restart a run);
* optionally (``rotary``, ``pretrain.model.rotary``) rotary position embeddings (RoPE, Su et
  al. 2021; LlamaGen, Chameleon and Emu3 use them) of every head's queries and keys at the
  same positions, on top of the learned absolute ones: attention scores then also depend on
  how far apart two tokens are, which is what "the word after *left:*" needs wherever a caption
  puts it. Also this project's addition (README, Quality experiments);
* truncated-normal init with ``std = init_std`` (0.006), cut at +-2 std, and zero-initialised
  output projections (attention out-projection and MLP down-projection of every block), so at
  init every block is the identity on the residual stream;
* attention through :func:`torch.nn.functional.scaled_dot_product_attention`.

The output head is a separate matrix, *untied* from the token embedding.

Generation uses a preallocated :class:`KVCache`: ``model(ids, kv_cache=cache)`` feeds new tokens
that attend to the cached keys/values and to each other (causally), continue each row's positions
and append their keys/values to the cache in place.

Prompts of different lengths share a batch by *left padding*: ``pad_mask`` (``True`` = real
token) keeps padded keys out of attention and gives every row positions ``0, 1, ...`` from its
first real token, so a padded row computes exactly what it computes alone. The cache remembers
which of its slots are padding and each row's next position.

Training batches are right-padded (each row's tokens first, then padding, rows sorted longest
first). With ``select`` (the positions whose predictions the loss uses) the forward runs on
:class:`~cm3leon.model.unpadded.TrimmedGrids`: runs of 4 rows, each trimmed to its own longest
row and laid flat one after another, so every matrix multiply skips nearly all padding and
attention sees each run as a ``(rows, length)`` view; the head scores only the selected
positions. The values are those of the padded forward at the same positions (the same
arithmetic, only the rows of each multiply differ).

A model is rebuilt from its :class:`TransformerShape` (``to_dict``/``from_dict``), which every
checkpoint stores beside the weights (STYLE.md §6).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cm3leon.config import ModelConfig
from cm3leon.model.unpadded import TrimmedGrids


@dataclass(frozen=True)
class TransformerShape:
    """Everything needed to rebuild a :class:`DecoderLM` (stored in checkpoints)."""

    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    max_seq_len: int
    init_std: float = 0.006
    image_cells: int = 0  # > 0: image tokens get a cell embedding (tokens per image)
    image_offset: int = 0  # first image id; image ids are [image_offset, vocab_size)
    rotary: bool = False  # + rotary position embedding (RoPE) of queries and keys

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"TransformerShape.d_model ({self.d_model}) must be divisible by "
                f"n_head ({self.n_head})"
            )
        if self.rotary and self.head_dim % 2:
            raise ValueError(f"TransformerShape.rotary needs an even head_dim, got {self.head_dim}")
        if self.init_std <= 0:
            raise ValueError(f"TransformerShape.init_std must be > 0, got {self.init_std}")
        if self.image_cells < 0 or (
            self.image_cells and not 0 < self.image_offset < self.vocab_size
        ):
            raise ValueError(
                "TransformerShape.image_cells needs image_offset inside the vocabulary, got "
                f"image_cells={self.image_cells}, image_offset={self.image_offset}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransformerShape:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown TransformerShape key(s) {unknown}; valid keys: {sorted(known)} "
                "(checkpoint from another version?)"
            )
        return cls(**data)

    @classmethod
    def from_config(
        cls,
        model_config: ModelConfig,
        vocab_size: int,
        image_offset: int = 0,
        image_tokens: int = 0,
    ) -> TransformerShape:
        """The shape of ``pretrain.model`` (preset + overrides) for a vocabulary of this size;
        with ``image_positions`` on, image ids start at ``image_offset`` and an image is
        ``image_tokens`` tokens."""
        cells = {}
        if model_config.image_positions:
            if image_tokens < 1:
                raise ValueError("pretrain.model.image_positions needs the tokens per image")
            cells = {"image_cells": image_tokens, "image_offset": image_offset}
        return cls(
            vocab_size=vocab_size,
            init_std=model_config.init_std,
            rotary=model_config.rotary,
            **model_config.shape(),
            **cells,
        )


class KVCache:
    """Preallocated keys/values of every layer, each ``(B, n_head, max_len, head_dim)``.

    ``length`` positions are filled. The model writes new entries for all layers at
    ``[length, length + T)`` and then calls :meth:`advance`.
    """

    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        length: int = 0,
        valid: torch.Tensor | None = None,
        next_position: torch.Tensor | None = None,
        image_run: torch.Tensor | None = None,
    ):
        if len(keys) != len(values) or not keys:
            raise ValueError("KVCache needs one key and one value tensor per layer")
        self.keys = keys  # n_layer x (B, n_head, max_len, head_dim)
        self.values = values  # n_layer x (B, n_head, max_len, head_dim)
        self.length = length
        B, _, max_len, _ = keys[0].shape
        device = keys[0].device
        # (B, max_len) True where a filled slot holds a real token (not left padding)
        self.valid = (
            torch.ones(B, max_len, dtype=torch.bool, device=device) if valid is None else valid
        )
        # (B,) the position the next real token of each row gets
        self.next_position = (
            torch.full((B,), length, dtype=torch.long, device=device)
            if next_position is None
            else next_position
        )
        # (B,) image ids at the end of each row so far: the cell of its next image token - 1
        self.image_run = (
            torch.zeros(B, dtype=torch.long, device=device) if image_run is None else image_run
        )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, n_head, T, head_dim) after the filled part of ``layer``; return the
        layer's keys and values up to and including them, (B, n_head, length + T, head_dim)."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, indices: torch.Tensor | list[int]) -> KVCache:
        """A new cache holding rows ``indices`` of this one (in that order, repeats allowed):
        reorders for beam search, or expands a prompt's cache to several samples."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.keys[0].device)
        return KVCache(
            [k.index_select(0, index) for k in self.keys],
            [v.index_select(0, index) for v in self.values],
            self.length,
            self.valid.index_select(0, index),
            self.next_position.index_select(0, index),
            self.image_run.index_select(0, index),
        )

    def clone(self) -> KVCache:
        return KVCache(
            [k.clone() for k in self.keys],
            [v.clone() for v in self.values],
            self.length,
            self.valid.clone(),
            self.next_position.clone(),
            self.image_run.clone(),
        )


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.n_head = shape.n_head
        self.head_dim = shape.head_dim
        self.qkv_proj = nn.Linear(shape.d_model, 3 * shape.d_model, bias=False)
        self.out_proj = nn.Linear(shape.d_model, shape.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        attn_mask: torch.Tensor | None = None,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
        grids: TrimmedGrids | None = None,
    ) -> torch.Tensor:
        """``attn_mask`` (B, 1, T, past + T), True = attend, replaces the causal rule when
        rows are padded (built once per forward by :class:`DecoderLM`); ``rotation``: the
        rotary ``(cos, sin)`` of each token's position, each ``(B or 1, 1, T, head_dim / 2)``.
        With ``grids``, ``x`` is (M, D), the slots of right-padded rows in trimmed grids: the
        projections run on them flat and attention on each grid's (rows, length) view (pads
        come after every real token of their row, so the causal rule keeps them out of its
        view)."""
        if grids is not None:  # x: (M, D)
            qkv = grids.split(self.qkv_proj(x))  # per grid (rows, length, 3D), views
            return self.out_proj(grids.join([self._causal(g, rotation) for g in qkv]))
        B, T, D = x.shape
        q, k, v = self.qkv_proj(x).split(D, dim=-1)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, n_head, T, head_dim)
        if rotation is not None:
            q, k = rotate(q, *rotation), rotate(k, *rotation)  # cached keys are rotated
        past = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None:
            # (B, n_head, past + T, head_dim); cast back in case the cache's dtype differs
            # from the activations' (e.g. an fp32 cache under bf16 autocast).
            k, v = (t.to(q.dtype) for t in kv_cache.write(layer, k, v))
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif past == 0:
            # Queries and keys are aligned: the plain causal mask is right.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            # One new token attends to everything before it and to itself: no mask.
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # `is_causal` assumes a square, top-left aligned mask; with a cache the new query i
            # sits at position past + i and may see keys 0 .. past + i (True = attend).
            query_pos = torch.arange(past, past + T, device=x.device)[:, None]  # (T, 1)
            key_pos = torch.arange(past + T, device=x.device)[None, :]  # (1, past + T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_pos <= query_pos)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out_proj(y)

    def _causal(
        self, qkv: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """Causal attention of right-padded rows without a cache: ``qkv`` (B, T, 3D) from
        position 0 -> (B, T, D) before the out-projection."""
        B, T, D3 = qkv.shape
        q, k, v = (
            t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in qkv.split(D3 // 3, -1)
        )  # (B, n_head, T, head_dim)
        if rotation is not None:
            cos, sin = (r[:, :, :T] for r in rotation)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_head, T, head_dim)
        return y.transpose(1, 2).reshape(B, T, D3 // 3)


ROTARY_BASE = 10_000.0


def rotary_angles(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (Su et al. 2021): ``(cos, sin)`` of ``positions`` (B or 1, T) times the frequencies
    ``ROTARY_BASE ** (-2i / head_dim)``, each ``(B or 1, 1, T, head_dim / 2)``."""
    half = head_dim // 2
    frequencies = ROTARY_BASE ** (
        -torch.arange(half, device=positions.device, dtype=torch.float32) / half
    )
    angles = positions.float()[..., None] * frequencies  # (B or 1, T, half)
    return angles.cos()[:, None], angles.sin()[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair ``(x[..., i], x[..., i + half])`` of ``x`` (B, H, T, head_dim) by its
    angle (the GPT-NeoX / Llama layout)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class MLP(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.up_proj = nn.Linear(shape.d_model, 4 * shape.d_model, bias=False)
        self.down_proj = nn.Linear(4 * shape.d_model, shape.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``; norms have no parameters."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.attn_norm = nn.LayerNorm(shape.d_model, elementwise_affine=False)
        self.attn = CausalSelfAttention(shape)
        self.mlp_norm = nn.LayerNorm(shape.d_model, elementwise_affine=False)
        self.mlp = MLP(shape)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None,
        layer: int,
        attn_mask: torch.Tensor | None = None,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
        grids: TrimmedGrids | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), kv_cache, layer, attn_mask, rotation, grids)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """Token + learned position embeddings, ``n_layer`` pre-norm blocks, a parameter-free final
    LayerNorm and an untied, bias-free output head."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.shape = shape
        self.token_embedding = nn.Embedding(shape.vocab_size, shape.d_model)
        self.position_embedding = nn.Embedding(shape.max_seq_len, shape.d_model)
        # row 0: not an image token; rows 1..image_cells: the cells of an image, in token order
        self.cell_embedding = (
            nn.Embedding(shape.image_cells + 1, shape.d_model) if shape.image_cells else None
        )
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.final_norm = nn.LayerNorm(shape.d_model, elementwise_affine=False)
        self.head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal (std ``init_std``, cut at +-2 std) for every weight; zeros for the
        output projections of every block (CM3Leon §2.3)."""
        std = self.shape.init_std
        for parameter in self.parameters():
            nn.init.trunc_normal_(parameter, mean=0.0, std=std, a=-2 * std, b=2 * std)
        for block in self.blocks:
            nn.init.zeros_(block.attn.out_proj.weight)
            nn.init.zeros_(block.mlp.down_proj.weight)

    def forward(
        self,
        ids: torch.Tensor,
        kv_cache: KVCache | None = None,
        pad_mask: torch.Tensor | None = None,
        cells: torch.Tensor | None = None,
        real: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``(B, T)``; with a cache, ``ids`` continue
        the cached sequence and the cache is extended in place. ``pad_mask`` (B, T), True for
        real tokens, marks left padding (logits at padded positions are meaningless).
        ``cells`` (B, T): each token's image cell (0: not an image token), for shapes with
        ``image_cells``; by default :meth:`image_runs` of the ids.

        Training on right-padded rows: ``select`` (B, T) bool returns only the logits of those
        positions, ``(N_select, vocab_size)`` in row order, computing every matmul on the
        ``real`` (B, T) tokens alone (default: every position is real); ``select`` must lie
        within ``real``. No cache, no ``pad_mask``."""
        B, T = ids.shape
        past = 0 if kv_cache is None else kv_cache.length
        if past + T > self.shape.max_seq_len:
            raise ValueError(
                f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds the model's "
                f"max_seq_len {self.shape.max_seq_len}; truncate the input or use a larger preset"
            )
        if select is not None:
            if kv_cache is not None or pad_mask is not None:
                raise ValueError("select is for training rows: no kv_cache, no pad_mask")
            return self._selected_logits(ids, cells, real, select)
        if kv_cache is not None:
            if kv_cache.batch_size != B:
                raise ValueError(f"KV cache holds {kv_cache.batch_size} rows but ids have {B}")
            if past + T > kv_cache.max_len:
                raise ValueError(
                    f"KV cache of max_len {kv_cache.max_len} cannot hold {past + T} tokens; "
                    "create it with a larger max_len"
                )
        padded = pad_mask is not None and not bool(pad_mask.all())
        if kv_cache is not None:
            padded = padded or not bool(kv_cache.valid[:, :past].all())
        attn_mask = None
        if padded:
            real = torch.ones_like(ids, dtype=torch.bool) if pad_mask is None else pad_mask
            start = (
                torch.zeros(B, dtype=torch.long, device=ids.device)
                if kv_cache is None
                else kv_cache.next_position
            )
            # each row counts positions from its own first real token; pads reuse a neighbour's
            positions = (start[:, None] + real.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
            keys_real = real if kv_cache is None else torch.cat([kv_cache.valid[:, :past], real], 1)
            query_pos = torch.arange(past, past + T, device=ids.device)[:, None]  # (T, 1)
            key_pos = torch.arange(past + T, device=ids.device)[None, :]  # (1, past + T)
            causal = key_pos <= query_pos  # (T, past + T)
            # (B, 1, T, past + T); a query always sees itself so padded rows never go all-False
            attn_mask = (causal & keys_real[:, None, None, :]) | (key_pos == query_pos)
        else:
            positions = torch.arange(past, past + T, device=ids.device)[None, :]  # (1, T)
            if kv_cache is not None:
                positions = kv_cache.next_position[:, None] + torch.arange(T, device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)  # (B, T, D)
        if self.cell_embedding is not None:
            run = self.image_runs(ids, kv_cache)  # (B, T)
            x = x + self.cell_embedding(self._cells(run) if cells is None else cells)
        rotation = rotary_angles(positions, self.shape.head_dim) if self.shape.rotary else None
        for layer, block in enumerate(self.blocks):
            x = block(x, kv_cache, layer, attn_mask, rotation)
        if kv_cache is not None:
            real = torch.ones_like(ids, dtype=torch.bool) if pad_mask is None else pad_mask
            kv_cache.valid[:, past : past + T] = real
            kv_cache.next_position = kv_cache.next_position + real.long().sum(1)
            if self.cell_embedding is not None:
                kv_cache.image_run = run[:, -1]
            kv_cache.advance(T)
        return self.head(self.final_norm(x))  # (B, T, V)

    def _selected_logits(
        self,
        ids: torch.Tensor,
        cells: torch.Tensor | None,
        real: torch.Tensor | None,
        select: torch.Tensor,
    ) -> torch.Tensor:
        """``forward(ids, cells=cells)[select]`` with the matmuls on the trimmed grids of the
        ``real`` rows (:class:`TrimmedGrids`) and the head on the ``select`` positions only."""
        if real is None:  # no padding: full-length grids
            real = torch.ones_like(ids, dtype=torch.bool)
        elif bool((select & ~real).any()):
            raise ValueError("select marks positions outside real (padding has no logits)")
        T = ids.shape[1]
        grids = TrimmedGrids.of(real)  # M slots, rows in grids of ROWS_PER_ATTENTION_GRID
        x = self.token_embedding(ids.flatten()[grids.index])  # (M, D)
        x = x + self.position_embedding(grids.index % T)
        if self.cell_embedding is not None:
            if cells is None:
                cells = self._cells(self.image_runs(ids))  # (B, T)
            x = x + self.cell_embedding(cells.flatten()[grids.index])
        positions = torch.arange(T, device=ids.device)[None, :]  # (1, T)
        rotation = rotary_angles(positions, self.shape.head_dim) if self.shape.rotary else None
        for layer, block in enumerate(self.blocks):
            x = block(x, None, layer, None, rotation, grids)
        x = x.index_select(0, grids.slots(select))  # (N_select, D)
        return self.head(self.final_norm(x))

    def _cells(self, run: torch.Tensor) -> torch.Tensor:
        """Image cell (1 .. image_cells; 0: not an image token) of each token, from its
        position in its image run (:meth:`image_runs`)."""
        return torch.where(run > 0, (run - 1) % self.shape.image_cells + 1, 0)

    def image_runs(self, ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """(B, T): how many image ids end at each token (its own included; 0 for any other
        token), continuing each row's run from the cache. An intact image's tokens get
        ``1 .. image_cells``."""
        image = ids >= self.shape.image_offset  # (B, T): image ids are the vocabulary's last
        index = torch.arange(ids.shape[1], device=ids.device)
        last_other = torch.where(image, -1, index).cummax(1).values  # (B, T)
        start = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        if kv_cache is not None:
            start = kv_cache.image_run
        run = torch.where(last_other < 0, index + 1 + start[:, None], index - last_other)
        return torch.where(image, run, 0)

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for ``batch_size`` rows of up to ``max_len`` (default max_seq_len)
        tokens, on the model's device and dtype unless given."""
        max_len = self.shape.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.shape.max_seq_len:
            raise ValueError(f"cache max_len must be in [1, {self.shape.max_seq_len}]")
        reference = self.head.weight
        size = (batch_size, self.shape.n_head, max_len, self.shape.head_dim)
        kwargs = {"device": device or reference.device, "dtype": dtype or reference.dtype}
        return KVCache(
            [torch.zeros(size, **kwargs) for _ in range(self.shape.n_layer)],
            [torch.zeros(size, **kwargs) for _ in range(self.shape.n_layer)],
        )

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The transformer blocks' 2-D weights (projections and MLP), what Muon orthogonalizes;
        the embedding tables and the output head are not hidden (Jordan et al. 2024)."""
        return [p for p in self.blocks.parameters() if p.ndim == 2]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """All parameters, or only those used in matrix multiplies (blocks and output head)
        when ``exclude_embeddings`` drops the token and position lookup tables."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.token_embedding.weight.numel() + self.position_embedding.weight.numel()
            if self.cell_embedding is not None:
                total -= self.cell_embedding.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context length ``seq_len``:
        ``6 N + 12 L d T`` (Kaplan et al. 2020; PaLM Appendix B).

        ``N`` is :meth:`num_parameters` without the embedding tables (lookups do no matmul; the
        untied head does and is counted): 2 FLOPs per weight forward, 4 backward. ``12 L d T`` is
        the attention scores and weighted sum (``QK^T`` and ``AV``, 2 d T FLOPs each per token
        and layer forward, x3 with backward), counted over the full ``T`` as is usual, even
        though causal attention needs only about half. Divide achieved FLOP/s by peak for MFU.
        """
        n = self.num_parameters(exclude_embeddings=True)
        return 6 * n + 12 * self.shape.n_layer * self.shape.d_model * seq_len
