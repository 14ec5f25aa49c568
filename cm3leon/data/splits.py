"""Train/val/test assignment by image content, so no identical image is shared across splits.

Splits are assigned per unique image (its ``image_sha256``), never per row: every copy of an
image lands in the same split. Unique images are ordered by a seeded hash and cut at the
configured fractions, so proportions are exact up to rounding and the assignment is a pure
function of the image bytes and the seed. Rows whose split the user gave keep it, and an
unassigned copy of such an image follows the user's choice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cm3leon.data.corpus import SPLITS


def assign_splits(
    hashes: Sequence[str],
    fractions: dict[str, float],
    seed: int,
    given: Sequence[str | None] | None = None,
) -> list[str]:
    """One split name per row. ``given`` holds user-provided splits (``None`` = assign)."""
    given = list(given) if given is not None else [None] * len(hashes)
    if len(given) != len(hashes):
        raise ValueError("hashes and given splits differ in length")
    fixed: dict[str, str] = {}
    for digest, split in zip(hashes, given, strict=True):
        if split is not None:
            fixed.setdefault(digest, split)
    free = sorted(
        {h for h, s in zip(hashes, given, strict=True) if s is None and h not in fixed},
        key=lambda h: hashlib.sha256(f"{seed}:{h}".encode()).hexdigest(),
    )
    assigned: dict[str, str] = {}
    start = 0
    for i, split in enumerate(SPLITS):
        end = len(free) if i == len(SPLITS) - 1 else start + round(fractions[split] * len(free))
        for digest in free[start:end]:
            assigned[digest] = split
        start = end
    return [
        s if s is not None else fixed.get(h) or assigned[h]
        for h, s in zip(hashes, given, strict=True)
    ]
