"""ShapeWorld: the embedded, procedurally generated image-caption corpus (DESIGN.md §4).

A scene is a few objects, each with a shape, a color and a size, placed in distinct cells of a
``grid_size`` x ``grid_size`` grid and shifted by a few pixels of jitter. Scenes are sampled
deterministically from a seeded ``numpy`` generator, rendered anti-aliased (4x4 supersampling) on
a black background, and described by several paraphrased caption templates. Because the
generator knows the truth, every downstream capability can be scored exactly with the parser in
:mod:`cm3leon.data.shapeworld_parser`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cm3leon.config import ShapeWorldConfig

SHAPES = ("square", "circle", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
}
# Object extent (side or diameter) as a fraction of the grid cell.
SIZES: dict[str, float] = {"small": 0.55, "large": 0.85}
BACKGROUND = (0, 0, 0)
GRID_POSITION_NAMES: dict[int, tuple[tuple[str, ...], ...]] = {
    2: (("top left", "top right"), ("bottom left", "bottom right")),
    3: (
        ("top left", "top", "top right"),
        ("left", "center", "right"),
        ("bottom left", "bottom", "bottom right"),
    ),
}
SUPERSAMPLE = 4

CAPTION_TEMPLATES = (
    "{objects_at}",
    "there is {objects_at}",
    "{objects_colon}",
    "an image with {objects_at}",
)


@dataclass(frozen=True)
class ShapeObject:
    """One object: attributes, grid cell ``(row, col)`` and pixel jitter ``(dx, dy)``."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    dx: int = 0
    dy: int = 0

    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


Scene = tuple[ShapeObject, ...]


def position_name(row: int, col: int, grid_size: int) -> str:
    return GRID_POSITION_NAMES[grid_size][row][col]


def sample_scene(rng: np.random.Generator, config: ShapeWorldConfig) -> Scene:
    """Draw one scene: object count, distinct cells, attributes and jitter, in reading order."""
    if config.object_weights is None:
        n = int(rng.integers(config.min_objects, config.max_objects + 1))
    else:
        weights = np.asarray(config.object_weights, dtype=np.float64)
        counts = np.arange(config.min_objects, config.max_objects + 1)
        n = int(rng.choice(counts, p=weights / weights.sum()))
    cells = sorted(rng.choice(config.grid_size**2, size=n, replace=False).tolist())
    jitter = config.position_jitter
    objects = []
    for cell in cells:
        objects.append(
            ShapeObject(
                shape=config.shapes[int(rng.integers(len(config.shapes)))],
                color=config.colors[int(rng.integers(len(config.colors)))],
                size=config.sizes[int(rng.integers(len(config.sizes)))],
                row=cell // config.grid_size,
                col=cell % config.grid_size,
                dx=int(rng.integers(-jitter, jitter + 1)),
                dy=int(rng.integers(-jitter, jitter + 1)),
            )
        )
    return tuple(objects)


def object_alpha(
    obj: ShapeObject, image_size: int, grid_size: int, offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Anti-aliased coverage ``(H, W)`` in [0, 1] of one object, optionally shifted further."""
    cell = image_size / grid_size
    cx = (obj.col + 0.5) * cell + obj.dx + offset[0]
    cy = (obj.row + 0.5) * cell + obj.dy + offset[1]
    half = SIZES[obj.size] * cell / 2
    # Sub-pixel sample coordinates: (H*S,) along each axis.
    samples = (np.arange(image_size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    u = samples[None, :] - cx  # (1, W*S)
    v = samples[:, None] - cy  # (H*S, 1)
    if obj.shape == "square":
        inside = (np.abs(u) <= half) & (np.abs(v) <= half)
    elif obj.shape == "circle":
        inside = u**2 + v**2 <= half**2
    elif obj.shape == "triangle":
        # Apex up, base at the bottom: the half-width grows linearly from 0 to `half`.
        inside = (v >= -half) & (v <= half) & (np.abs(u) <= (v + half) / 2)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")
    s = SUPERSAMPLE
    return inside.reshape(image_size, s, image_size, s).mean(axis=(1, 3))


def render_scene(scene: Scene, image_size: int, grid_size: int) -> np.ndarray:
    """Render a scene to an ``(H, W, 3)`` uint8 RGB image."""
    canvas = np.zeros((image_size, image_size, 3), dtype=np.float64)
    canvas[:] = BACKGROUND
    for obj in scene:
        alpha = object_alpha(obj, image_size, grid_size)[..., None]
        canvas = canvas * (1 - alpha) + np.asarray(COLORS[obj.color], dtype=np.float64) * alpha
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def object_mask(obj: ShapeObject, image_size: int, grid_size: int) -> np.ndarray:
    """Binary ``(H, W)`` uint8 mask (0 or 255) of the pixels an object covers at least half."""
    return np.where(object_alpha(obj, image_size, grid_size) >= 0.5, 255, 0).astype(np.uint8)


def caption_scene(scene: Scene, grid_size: int) -> tuple[str, ...]:
    """All paraphrases of a scene's caption, one per template in ``CAPTION_TEMPLATES``."""
    ats = [f"a {o.phrase()} at the {position_name(o.row, o.col, grid_size)}" for o in scene]
    colons = [f"{position_name(o.row, o.col, grid_size)}: {o.phrase()}" for o in scene]
    fields = {"objects_at": " and ".join(ats), "objects_colon": ", ".join(colons)}
    return tuple(t.format(**fields) for t in CAPTION_TEMPLATES)


def describe_object(obj: ShapeObject, scene: Scene, grid_size: int) -> str:
    """The shortest phrase (shape, color+shape, full phrase, + position) naming ``obj`` uniquely."""
    candidates = (
        (lambda o: o.shape, obj.shape),
        (lambda o: (o.color, o.shape), f"{obj.color} {obj.shape}"),
        (lambda o: (o.size, o.color, o.shape), obj.phrase()),
    )
    for key, text in candidates:
        if sum(key(o) == key(obj) for o in scene) == 1:
            return text
    return f"{obj.phrase()} at the {position_name(obj.row, obj.col, grid_size)}"


def scene_to_json(scene: Scene) -> str:
    return json.dumps([asdict(o) for o in scene], sort_keys=True)


def scene_from_json(text: str) -> Scene:
    return tuple(ShapeObject(**o) for o in json.loads(text))


def free_cells(scene: Scene, grid_size: int) -> list[tuple[int, int]]:
    used = {(o.row, o.col) for o in scene}
    return [(r, c) for r in range(grid_size) for c in range(grid_size) if (r, c) not in used]


def replace_object(scene: Scene, index: int, **changes: object) -> Scene:
    """A new scene with object ``index`` changed, kept in reading order."""
    objects = list(scene)
    objects[index] = replace(objects[index], **changes)
    return tuple(sorted(objects, key=lambda o: (o.row, o.col)))


def generate_scenes(config: ShapeWorldConfig, seed: int) -> list[Scene]:
    """``config.num_images`` scenes, a pure function of ``(config, seed)``."""
    rng = np.random.default_rng([seed, 0x5A])
    return [sample_scene(rng, config) for _ in range(config.num_images)]


def render_scenes(scenes: Sequence[Scene], image_size: int, grid_size: int) -> np.ndarray:
    """Render many scenes to ``(N, H, W, 3)`` uint8."""
    return np.stack([render_scene(s, image_size, grid_size) for s in scenes])
