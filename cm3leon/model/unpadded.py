"""The trimmed-grid training layout: right-padded rows without most of their padding.

Training batches hold sequences of different lengths padded on the right, their rows sorted
longest first (:func:`~cm3leon.training.sequences.collate`). A padded forward spends every
matmul on the padding too. :class:`TrimmedGrids` cuts the batch into runs of consecutive rows
(grids), trims each grid to its own longest row and lays the grids one after another, flat:
``(M, C)`` with ``M = sum(rows * length)``. Every matmul runs on that flat layout; attention,
the one operation that needs ``(rows, length)``, sees each grid as a view of it, and one
``cat`` per layer joins the grids' outputs again. With sorted rows a grid's rows have nearly
equal lengths, so little padding is left for either (the idea of FlashAttention-2's
variable-length batches and of Hugging Face's ``_upad_input``, here with plain
``scaled_dot_product_attention``). Used by :meth:`~cm3leon.model.transformer.DecoderLM.forward`
with ``select``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Rows per grid (rows sorted by length, as `collate` leaves them): 4 measured best on
# ShapeWorld pretraining batches of 16 rows, 2-core Xeon, fp32 (one grid of 16: +2% tokens/s
# over the padded forward; 8 rows +5%; 4 rows +8%; 2 rows -1%).
ROWS_PER_ATTENTION_GRID = 4


@dataclass(frozen=True)
class TrimmedGrids:
    """Right-padded ``(B, T)`` rows as grids of consecutive rows, each ``(rows, length)`` with
    ``length`` its longest row, flattened and concatenated: ``M = sum(rows * length)`` slots.

    ``index`` (M,): each slot's flat position ``row * T + t`` in the ``(B, T)`` batch, in row
    order; ``shapes``: each grid's ``(rows, length)``. A slot past its row's last real token
    holds that row's padding: it comes after every real token of its row, so causal attention
    keeps it out of their view."""

    index: torch.Tensor
    shapes: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, real: torch.Tensor, rows_per_grid: int = ROWS_PER_ATTENTION_GRID) -> TrimmedGrids:
        """Layout of ``real`` (B, T), True at real tokens, which must be right padding (each
        row's real tokens first); empty grids (every row without a token) are left out."""
        B, T = real.shape
        if T > 1 and bool((real[:, 1:] & ~real[:, :-1]).any()):
            raise ValueError("real must mark right padding: a padded slot before a real token")
        lengths = real.sum(1).tolist()  # (B,)
        parts, shapes = [], []
        for lo in range(0, B, rows_per_grid):
            hi = min(lo + rows_per_grid, B)
            length = max(lengths[lo:hi])
            if length == 0:
                continue
            rows = torch.arange(lo, hi, device=real.device)[:, None] * T  # (rows, 1)
            parts.append((rows + torch.arange(length, device=real.device)).flatten())
            shapes.append((hi - lo, length))
        index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return cls(index, tuple(shapes))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Slots per grid."""
        return tuple(rows * length for rows, length in self.shapes)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(M, C) -> one (rows, length, C) view per grid."""
        return [
            part.view(rows, length, -1)
            for part, (rows, length) in zip(x.split(self.sizes), self.shapes, strict=True)
        ]

    def join(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`split`'s inverse: (rows, length, C) grids -> (M, C)."""
        flat = [grid.reshape(-1, grid.shape[-1]) for grid in grids]
        return torch.cat(flat) if len(flat) > 1 else flat[0]

    def slots(self, mask: torch.Tensor) -> torch.Tensor:
        """Slot numbers (into M, ascending: row order) of the True entries of ``mask`` (B, T)
        that lie within the grids."""
        return mask.flatten()[self.index].nonzero().squeeze(1)
