"""The unpadded training layout: right-padded rows as their real tokens alone.

Training batches hold sequences of different lengths padded on the right
(:func:`~cm3leon.training.sequences.collate`). A padded forward spends every matmul on the
padding too; :class:`Unpadded` flattens the ``N`` real tokens to ``(N, C)`` for the matmuls and
scatters them back into padded grids only for attention, the one operation that needs the
``(rows, length)`` shape (the idea of FlashAttention-2's variable-length batches and of
Hugging Face's ``_upad_input``, here with plain ``scaled_dot_product_attention``: each grid is a
run of consecutive rows padded to its own longest row, so rows sorted by length waste little
attention either). Used by :meth:`~cm3leon.model.transformer.DecoderLM.forward` with
``select``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Rows per attention grid of the unpadded layout (rows sorted by length, as `collate` leaves
# them): 4 measured best on ShapeWorld pretraining batches of 16 rows, 2-core Xeon, fp32 —
# +8% tokens/s over the padded forward (one grid of 16: +2%; 8 rows: +5%; 2 rows: -1%).
ROWS_PER_ATTENTION_GRID = 4


@dataclass(frozen=True)
class Unpadded:
    """The ``N`` real tokens of right-padded rows, flattened in row order, and the grids
    attention sees them in: the rows split into ``len(shapes)`` runs of consecutive rows
    (buckets), each padded only to its own longest row, so attention over rows sorted by length
    computes little padding either.

    ``index`` (N,): each token's flat position ``row * T + t`` in the (B, T) batch; per bucket,
    ``sizes`` its real tokens, ``shapes`` its grid (rows, length) and ``slots`` (N_b,) each
    token's flat place ``row * length + t`` in that grid."""

    index: torch.Tensor
    sizes: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    slots: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, real: torch.Tensor, buckets: int = 1) -> Unpadded:
        """Layout of the True entries of ``real`` (B, T), which must be right padding (each
        row's real tokens first), with its rows in ``buckets`` runs of about equal size."""
        B, T = real.shape
        if T > 1 and bool((real[:, 1:] & ~real[:, :-1]).any()):
            raise ValueError("real must mark right padding: a padded slot before a real token")
        lengths = real.sum(1).tolist()  # (B,)
        bounds = [round(i * B / buckets) for i in range(buckets + 1)]
        sizes, shapes, slots = [], [], []
        for lo, hi in itertools.pairwise(bounds):
            length = max(lengths[lo:hi], default=0)
            if length == 0:
                continue
            sizes.append(sum(lengths[lo:hi]))
            shapes.append((hi - lo, length))
            slots.append(real[lo:hi, :length].flatten().nonzero().squeeze(1))
        return cls(real.flatten().nonzero().squeeze(1), tuple(sizes), tuple(shapes), tuple(slots))

    def pad(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, C) -> one (rows, length, C) grid per bucket, zeros at the padding
        (differentiable in ``x``)."""
        grids = []
        for part, slots, (rows, length) in zip(
            x.split(self.sizes), self.slots, self.shapes, strict=True
        ):
            grid = part.new_zeros(rows * length, part.shape[-1]).index_copy(0, slots, part)
            grids.append(grid.view(rows, length, -1))
        return grids

    def unpad(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`pad`'s grids -> (N, C): the real tokens' rows."""
        parts = [
            grid.reshape(-1, grid.shape[-1]).index_select(0, slots)
            for grid, slots in zip(grids, self.slots, strict=True)
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0]
