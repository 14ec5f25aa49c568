"""Read a ShapeWorld image back into objects and attributes (DESIGN.md §4).

The parser judges VQ reconstructions and model generations, so it must stay right on mildly
degraded renders (blur, color shift, a pixel of jitter), not only on clean ones. It works cell by
cell:

1. estimate the background as the per-channel median of the image;
2. in each grid cell's window, estimate the object color from the pixels farthest from the
   background, and turn the window into an observed coverage map ``alpha`` by projecting each
   pixel onto the background->color axis;
3. match ``alpha`` against rendered templates of every (shape, size, offset) combination for
   that cell, plus the empty template, by sum of squared differences; the best match wins;
4. name the color as the palette color nearest to the mean of the matched object's core pixels.

Template matching against renders of the generator itself is what keeps the parser robust where
threshold-and-fill-ratio rules break.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

from cm3leon.data.shapeworld import (
    COLORS,
    GRID_POSITION_NAMES,
    Scene,
    ShapeObject,
    object_alpha,
)

# Minimum distance (RGB units) from the background for a cell to hold any object at all.
MIN_OBJECT_CONTRAST = 60.0


@dataclass(frozen=True)
class ParsedObject:
    shape: str
    color: str
    size: str
    row: int
    col: int


class ShapeWorldParser:
    """Template-matching parser for one ShapeWorld configuration.

    ``max_offset`` is the largest shift (pixels, each axis) a template may take from the cell
    center; it should cover the generator's ``position_jitter`` plus the degradation tolerated.
    """

    def __init__(
        self,
        image_size: int,
        grid_size: int,
        shapes: Sequence[str],
        colors: Sequence[str],
        sizes: Sequence[str],
        max_offset: int = 2,
    ) -> None:
        self.image_size = image_size
        self.grid_size = grid_size
        self.shapes, self.colors, self.sizes = tuple(shapes), tuple(colors), tuple(sizes)
        self.palette = np.asarray([COLORS[c] for c in self.colors], dtype=np.float64)  # (C, 3)
        edges = np.rint(np.linspace(0, image_size, grid_size + 1)).astype(int)
        self.windows = [
            (slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1]))
            for r in range(grid_size)
            for c in range(grid_size)
        ]
        offsets = range(-max_offset, max_offset + 1)
        self.labels = [(s, z) for s, z in product(shapes, sizes) for _ in product(offsets, offsets)]
        # Per cell: templates (K, window pixels) restricted to the cell's window.
        self.templates = []
        for index, window in enumerate(self.windows):
            row, col = divmod(index, grid_size)
            rows = []
            for shape, size in product(shapes, sizes):
                for dx, dy in product(offsets, offsets):
                    obj = ShapeObject(shape, colors[0], size, row, col)
                    alpha = object_alpha(obj, image_size, grid_size, offset=(dx, dy))
                    rows.append(alpha[window].ravel())
            self.templates.append(np.stack(rows))

    @classmethod
    def from_config(cls, config, image_size: int, extra_offset: int = 1) -> ShapeWorldParser:
        """A parser for a :class:`~cm3leon.config.ShapeWorldConfig` corpus."""
        return cls(
            image_size,
            config.grid_size,
            config.shapes,
            config.colors,
            config.sizes,
            max_offset=config.position_jitter + extra_offset,
        )

    def parse(self, image: np.ndarray) -> list[ParsedObject]:
        """Objects found in an ``(H, W, 3)`` uint8 image, in reading order."""
        if image.shape != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"parser expects ({self.image_size}, {self.image_size}, 3) images,"
                f" got {image.shape}"
            )
        pixels = image.astype(np.float64)
        background = np.median(pixels.reshape(-1, 3), axis=0)
        found = []
        for index, window in enumerate(self.windows):
            patch = pixels[window].reshape(-1, 3) - background  # (P, 3)
            distance = np.linalg.norm(patch, axis=1)
            if distance.max() < MIN_OBJECT_CONTRAST:
                continue
            color_axis = patch[distance >= 0.8 * distance.max()].mean(axis=0)
            alpha = np.clip(patch @ color_axis / (color_axis @ color_axis), 0.0, 1.0)  # (P,)
            templates = self.templates[index]
            errors = ((templates - alpha) ** 2).sum(axis=1)
            best = int(errors.argmin())
            if (alpha**2).sum() <= errors[best]:
                continue  # the empty cell explains the window better than any object
            core = templates[best] >= 0.9
            if not core.any():
                core = templates[best] >= templates[best].max() * 0.5
            mean_color = patch[core].mean(axis=0) + background
            color = self.colors[int(np.linalg.norm(self.palette - mean_color, axis=1).argmin())]
            shape, size = self.labels[best]
            row, col = divmod(index, self.grid_size)
            found.append(ParsedObject(shape, color, size, row, col))
        return found


def truth_objects(scene: Scene) -> list[ParsedObject]:
    """A generator scene in the parser's terms (jitter dropped)."""
    return [ParsedObject(o.shape, o.color, o.size, o.row, o.col) for o in scene]


@dataclass(frozen=True)
class SceneAgreement:
    """Attribute-level agreement between a true scene and a parsed one.

    Each true object contributes four attributes (position, shape, color, size; a missing object
    gets all four wrong); each spurious parsed object adds four wrong attributes.
    """

    attributes_correct: int
    attributes_total: int
    exact: bool
    per_attribute: dict[str, tuple[int, int]]

    @property
    def accuracy(self) -> float:
        return self.attributes_correct / max(self.attributes_total, 1)


def compare_scene(truth: Sequence[ParsedObject], parsed: Sequence[ParsedObject]) -> SceneAgreement:
    by_cell = {(p.row, p.col): p for p in parsed}
    per = {name: [0, 0] for name in ("position", "shape", "color", "size")}
    for t in truth:
        p = by_cell.get((t.row, t.col))
        for name in per:
            per[name][1] += 1
            if p is not None and (name == "position" or getattr(p, name) == getattr(t, name)):
                per[name][0] += 1
    spurious = len({(p.row, p.col) for p in parsed} - {(t.row, t.col) for t in truth})
    for name in per:
        per[name][1] += spurious
    correct = sum(c for c, _ in per.values())
    total = sum(n for _, n in per.values())
    exact = sorted(map(_key, truth)) == sorted(map(_key, parsed))
    return SceneAgreement(correct, total, exact, {k: (c, n) for k, (c, n) in per.items()})


def _key(obj: ParsedObject) -> tuple:
    return (obj.row, obj.col, obj.shape, obj.color, obj.size)


def agreement_summary(agreements: Sequence[SceneAgreement]) -> dict[str, float]:
    """Pooled attribute accuracy, exact-scene rate and per-attribute accuracy."""
    correct = sum(a.attributes_correct for a in agreements)
    total = sum(a.attributes_total for a in agreements)
    summary = {
        "attribute_agreement": correct / max(total, 1),
        "exact_scene_rate": sum(a.exact for a in agreements) / max(len(agreements), 1),
    }
    for name in ("position", "shape", "color", "size"):
        c = sum(a.per_attribute[name][0] for a in agreements)
        n = sum(a.per_attribute[name][1] for a in agreements)
        summary[f"{name}_accuracy"] = c / max(n, 1)
    return summary


def parse_caption(
    text: str,
    grid_size: int,
    shapes: Sequence[str],
    colors: Sequence[str],
    sizes: Sequence[str],
) -> list[ParsedObject]:
    """Objects a caption states, in any of the generator's caption templates.

    Reads every ``size color shape at the position`` and ``position: size color shape`` phrase;
    an object phrase without a position is kept at cell ``(-1, -1)`` so it can never match. Text
    that names no object gives ``[]``. Judges generated captions by their attributes.
    """
    positions = {
        name: (r, c)
        for r, row in enumerate(GRID_POSITION_NAMES[grid_size])
        for c, name in enumerate(row)
    }
    alt = lambda names: "|".join(sorted(map(re.escape, names), key=len, reverse=True))  # noqa: E731
    obj = rf"(?P<size>{alt(sizes)}) (?P<color>{alt(colors)}) (?P<shape>{alt(shapes)})"
    where = rf"(?P<pos>{alt(positions)})"
    found: list[ParsedObject] = []
    lowered = text.lower()
    for pattern in (rf"{obj} at the {where}\b", rf"\b{where}: {obj}"):
        for m in re.finditer(pattern, lowered):
            row, col = positions[m["pos"]]
            found.append(ParsedObject(m["shape"], m["color"], m["size"], row, col))
    if not found:  # object phrases without a readable position
        for m in re.finditer(obj, lowered):
            found.append(ParsedObject(m["shape"], m["color"], m["size"], -1, -1))
    return sorted(found, key=lambda o: (o.row, o.col))


def same_objects(truth: Sequence[ParsedObject], parsed: Sequence[ParsedObject]) -> bool:
    """Exactly the same objects (every attribute of every object), order ignored."""
    return sorted(map(_key, truth)) == sorted(map(_key, parsed))
