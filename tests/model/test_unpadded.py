"""TrimmedGrids: the training layout of right-padded rows (slots, views, joins, errors)."""

from __future__ import annotations

import pytest
import torch

from cm3leon.model.unpadded import TrimmedGrids


def test_trimmed_grids_layout_and_errors():
    real = torch.arange(6)[None, :] < torch.tensor([5, 4, 2, 1, 1])[:, None]
    layout = TrimmedGrids.of(real, rows_per_grid=2)  # rows {0, 1}, {2, 3} and {4}
    assert layout.shapes == ((2, 5), (2, 2), (1, 1)) and layout.sizes == (10, 4, 1)
    # each slot's flat (row * 6 + t) position; row 1's fifth slot is its padding
    assert layout.index.tolist() == [*range(0, 5), *range(6, 11), 12, 13, 18, 19, 24]
    x = torch.arange(15.0)[:, None]
    grids = layout.split(x)
    assert [tuple(g.shape) for g in grids] == [(2, 5, 1), (2, 2, 1), (1, 1, 1)]
    assert grids[1][:, :, 0].tolist() == [[10.0, 11.0], [12.0, 13.0]]
    assert torch.equal(layout.join(grids), x)
    # the real tokens' slots, in row order: every slot but row 1's and row 3's padding
    assert layout.slots(real).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 14]
    empty = torch.zeros(3, 4, dtype=torch.bool)
    empty[0, :2] = True  # one grid of 2 rows with tokens, a second grid of none
    assert TrimmedGrids.of(empty, rows_per_grid=2).shapes == ((2, 2),)
    holes = real.clone()
    holes[0, 1] = False
    with pytest.raises(ValueError, match="right padding"):
        TrimmedGrids.of(holes)
