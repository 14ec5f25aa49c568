"""Task tables derived from ShapeWorld scenes (DESIGN.md §4, §8).

Because the generator knows every scene, each instruction-tuning task has an exact target:

- VQA: color / shape / position / count / existence questions with one-word answers;
- edits: recolor, reshape, resize or move one object; the target image is rendered from the
  edited scene;
- grounding: a prompt giving each object with its pixel bounding box;
- segmentation: "segment the <object>" with the object's binary mask as target.

Objects are always named by the shortest phrase that identifies them uniquely in their scene
(:func:`~cm3leon.data.shapeworld.describe_object`). All draws come from the caller's generator,
so tables are a pure function of the scenes and the seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cm3leon.data.shapeworld import (
    Scene,
    describe_object,
    free_cells,
    object_alpha,
    object_mask,
    position_name,
    render_scene,
    replace_object,
    scene_to_json,
)
from cm3leon.tasks import TABLE_TASKS

if TYPE_CHECKING:
    from cm3leon.config import ShapeWorldConfig

QUESTION_TYPES = ("color", "shape", "position", "count", "exists")
EDIT_TYPES = ("recolor", "reshape", "resize", "move")


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def vqa_rows(
    image_id: str, scene: Scene, config: ShapeWorldConfig, rng: np.random.Generator
) -> list[dict[str, str]]:
    """Up to ``config.vqa_per_image`` distinct questions about one scene."""
    g = config.grid_size
    rows: dict[str, dict[str, str]] = {}
    for _ in range(4 * config.vqa_per_image):
        if len(rows) >= config.vqa_per_image:
            break
        kind = _pick(rng, QUESTION_TYPES)
        obj = _pick(rng, scene)
        name = describe_object(obj, scene, g)
        where = position_name(obj.row, obj.col, g)
        if kind == "color":
            question, answer = f"what color is the {name}?", obj.color
        elif kind == "shape":
            question, answer = f"what shape is at the {where}?", obj.shape
        elif kind == "position":
            question, answer = f"where is the {name}?", where
        elif kind == "count":
            question, answer = "how many objects are there?", str(len(scene))
        else:
            color, shape = _pick(rng, config.colors), _pick(rng, config.shapes)
            present = any(o.color == color and o.shape == shape for o in scene)
            question, answer = f"is there a {color} {shape}?", "yes" if present else "no"
        rows.setdefault(
            question,
            {
                "image_id": image_id,
                "question": question,
                "answer": answer,
                "answers": [answer],  # one exact answer (a VQAv2 file gives ten)
                "question_type": kind,
            },
        )
    return list(rows.values())


def edit_rows(
    image_id: str, scene: Scene, config: ShapeWorldConfig, image_size: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """``config.edits_per_image`` edits of one scene, each with its rendered target image."""
    g = config.grid_size
    rows = []
    for _ in range(config.edits_per_image):
        index = int(rng.integers(len(scene)))
        obj = scene[index]
        name = describe_object(obj, scene, g)
        options = {
            "recolor": [c for c in config.colors if c != obj.color],
            "reshape": [s for s in config.shapes if s != obj.shape],
            "resize": [z for z in config.sizes if z != obj.size],
            "move": free_cells(scene, g),
        }
        kinds = [k for k in EDIT_TYPES if options[k]]
        if not kinds:
            continue
        kind = _pick(rng, kinds)
        choice = _pick(rng, options[kind])
        if kind == "recolor":
            target, instruction = (
                replace_object(scene, index, color=choice),
                f"make the {name} {choice}",
            )
        elif kind == "reshape":
            target = replace_object(scene, index, shape=choice)
            instruction = f"turn the {name} into a {choice}"
        elif kind == "resize":
            target, instruction = (
                replace_object(scene, index, size=choice),
                f"make the {name} {choice}",
            )
        else:
            row, col = choice
            target = replace_object(scene, index, row=row, col=col)
            instruction = f"move the {name} to the {position_name(row, col, g)}"
        rows.append(
            {
                "image_id": image_id,
                "instruction": instruction,
                "edit_type": kind,
                "target_image": render_scene(target, image_size, g).tobytes(),
                "target_objects": scene_to_json(target),
            }
        )
    return rows


def grounding_row(image_id: str, scene: Scene, config: ShapeWorldConfig, image_size: int) -> dict:
    """A prompt listing every object with its pixel box ``(x0, y0, x1, y1)``, end exclusive."""
    parts = []
    for obj in scene:
        ys, xs = np.nonzero(object_alpha(obj, image_size, config.grid_size) >= 0.5)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        parts.append(f"a {obj.color} {obj.shape} in box ({box[0]}, {box[1]}, {box[2]}, {box[3]})")
    return {"image_id": image_id, "prompt": " and ".join(parts), "objects": scene_to_json(scene)}


def segmentation_row(
    image_id: str, scene: Scene, config: ShapeWorldConfig, image_size: int, rng: np.random.Generator
) -> dict:
    """ "segment the <object>" with that object's binary mask as the target."""
    obj = _pick(rng, scene)
    return {
        "image_id": image_id,
        "instruction": f"segment the {describe_object(obj, scene, config.grid_size)}",
        "mask": object_mask(obj, image_size, config.grid_size).tobytes(),
        "target_object": scene_to_json((obj,)),
    }


# One scene's rows of each task table (the ShapeWorld builder of every table task in
# cm3leon.tasks). build_task_tables calls them in the registry's order, which fixes the order
# of the random draws.
ROW_BUILDERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "vqa": lambda image_id, scene, config, size, rng: vqa_rows(image_id, scene, config, rng),
    "edits": edit_rows,
    "grounding": lambda image_id, scene, config, size, rng: [
        grounding_row(image_id, scene, config, size)
    ],
    "segmentation": lambda image_id, scene, config, size, rng: [
        segmentation_row(image_id, scene, config, size, rng)
    ],
}


def build_task_tables(
    ids: Sequence[str],
    scenes: Sequence[Scene],
    config: ShapeWorldConfig,
    image_size: int,
    seed: int,
) -> dict[str, list[dict[str, Any]]]:
    """Every task table of the registry for a list of documents, deterministic in ``seed``."""
    missing = set(TABLE_TASKS) - set(ROW_BUILDERS)
    if missing:
        raise ValueError(f"no ShapeWorld builder for task tables {sorted(missing)}")
    rng = np.random.default_rng([seed, 0x7A5C])
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLE_TASKS}
    for image_id, scene in zip(ids, scenes, strict=True):
        for name in TABLE_TASKS:
            tables[name].extend(ROW_BUILDERS[name](image_id, scene, config, image_size, rng))
    return tables
