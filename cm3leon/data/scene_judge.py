"""The scene judge: the optional component that scores ShapeWorld outputs exactly (DESIGN.md §10).

ShapeWorld knows the truth of every image, so generated images, captions, edits and grounded
generations can be read back and compared attribute by attribute. Other data has no such
judge, and every stage runs without one (STYLE.md §17: optional components are passed in, not
branched on). The judge is built from the corpus artifact, never from params: ``prepare``
writes what the judge needs under the manifest's ``judge`` key (:func:`judge_manifest_entry`),
and a stage that can use a judge calls :func:`load_judge` on the corpus folder — ``None`` for
user data, so the generic path runs and the stage does not depend on ``data.shapeworld``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon.data.corpus import CorpusError, read_manifest
from cm3leon.data.shapeworld import scene_from_json
from cm3leon.data.shapeworld_parser import (
    ParsedObject,
    SceneAgreement,
    ShapeWorldParser,
    compare_scene,
    parse_caption,
    truth_objects,
)

JUDGE_KIND = "shapeworld"  # the only judge so far: ShapeWorld's template parser
_KEYS = ("image_size", "grid_size", "shapes", "colors", "sizes", "position_jitter")


def judge_manifest_entry(config: Any, image_size: int) -> dict[str, Any]:
    """The manifest's ``judge`` entry for a ShapeWorld corpus drawn with ``config``
    (:class:`~cm3leon.config.ShapeWorldConfig`): the palette, grid, sizes and jitter the parser
    needs, nothing that only the generator uses."""
    return {
        "kind": JUDGE_KIND,
        "image_size": int(image_size),
        "grid_size": int(config.grid_size),
        "shapes": list(config.shapes),
        "colors": list(config.colors),
        "sizes": list(config.sizes),
        "position_jitter": int(config.position_jitter),
    }


@dataclass(frozen=True)
class SceneJudge:
    """Exact reading of ShapeWorld images and captions.

    ``parse(image)`` reads an ``(H, W, 3)`` uint8 image into objects; ``parse_caption(text)``
    reads a caption the same way; ``truth(objects_json)`` gives a corpus row's true objects;
    ``compare(truth, parsed)`` the per-attribute agreement. The grid and the attribute
    vocabularies are the parser's."""

    parser: ShapeWorldParser

    @classmethod
    def from_entry(cls, entry: dict[str, Any], where: str = "judge") -> SceneJudge:
        """The judge a manifest ``judge`` entry describes; a malformed entry is an error naming
        ``where`` and the key."""
        if entry.get("kind") != JUDGE_KIND:
            raise CorpusError(f"{where}: unknown judge kind {entry.get('kind')!r}")
        missing = [k for k in _KEYS if k not in entry]
        if missing:
            raise CorpusError(f"{where}: judge entry lacks {missing}; rerun prepare")
        parser = ShapeWorldParser(
            int(entry["image_size"]),
            int(entry["grid_size"]),
            tuple(entry["shapes"]),
            tuple(entry["colors"]),
            tuple(entry["sizes"]),
            # the same tolerance as ShapeWorldParser.from_config: one pixel beyond the jitter
            max_offset=int(entry["position_jitter"]) + 1,
        )
        return cls(parser)

    def parse(self, image: np.ndarray) -> list[ParsedObject]:
        return self.parser.parse(image)

    def parse_caption(self, text: str) -> list:
        p = self.parser
        return parse_caption(text, p.grid_size, p.shapes, p.colors, p.sizes)

    @staticmethod
    def truth(objects_json: str) -> list:
        return truth_objects(scene_from_json(objects_json))

    def compare(self, truth: list, image: np.ndarray) -> SceneAgreement:
        return compare_scene(truth, self.parse(image))


def load_judge(corpus_dir: str | Path) -> SceneJudge | None:
    """The corpus's scene judge, or ``None`` when its manifest describes none (user data)."""
    manifest = read_manifest(corpus_dir)
    entry = manifest.get("judge")
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise CorpusError(f"{Path(corpus_dir) / 'manifest.json'}: 'judge' must be an object")
    return SceneJudge.from_entry(entry, f"{Path(corpus_dir) / 'manifest.json'}")
