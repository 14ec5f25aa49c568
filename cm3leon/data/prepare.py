"""Build the corpus artifact from the configured source (the ``prepare`` stage's library half).

``data.source`` picks the source:

- ``shapeworld`` (default): generate scenes from ``base.seed``, render them, caption them with
  every paraphrase template (the primary caption is drawn per image), derive the task tables;
- ``manifest`` / ``coco``: import the user's images and captions (:mod:`cm3leon.data.importers`);
  invalid rows either fail the stage, listing every problem, or go to the quarantine table,
  per ``data.on_invalid``. The task tables come from the user's task files (``data.tasks``,
  :mod:`cm3leon.data.task_files`), whose invalid rows go the same way; a task without a file
  has an empty table.

A ShapeWorld corpus also records its scene judge in the manifest
(:func:`~cm3leon.data.scene_judge.judge_manifest_entry`): the stages that score exactly build
the judge from the corpus, not from ``data.shapeworld``; user data has none.

Splits are then assigned by image content (:mod:`cm3leon.data.splits`) and everything is written
as one atomic corpus folder (:mod:`cm3leon.data.corpus`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cm3leon.config import DataConfig
from cm3leon.data.corpus import CorpusRecord, image_sha256, write_corpus
from cm3leon.data.importers import CAPTION_CHARS, apply_invalid_policy, load_coco, load_manifest
from cm3leon.data.scene_judge import judge_manifest_entry
from cm3leon.data.shapeworld import (
    Scene,
    caption_scene,
    generate_scenes,
    render_scene,
    scene_to_json,
)
from cm3leon.data.splits import assign_splits
from cm3leon.data.task_files import load_task_files
from cm3leon.data.tasks import build_task_tables

log = logging.getLogger(__name__)


def prepare_corpus(
    config: DataConfig,
    seed: int,
    out_dir: str | Path,
    caption_chars: tuple[int, int] = CAPTION_CHARS,
    tracked: str | Path | None = None,
) -> dict[str, Any]:
    """Write the corpus for ``config`` to ``out_dir``; returns its manifest. User rows whose
    caption is outside ``caption_chars`` (the validation gate's bounds) are invalid rows, under
    ``data.on_invalid`` like any other. ``tracked``: the folder the pipeline tracks as this
    stage's input (``data/raw``); user data paths outside it are refused (:func:`check_tracked`)."""
    if tracked is not None:
        check_tracked(config, tracked)
    if config.source == "shapeworld":
        scenes = generate_scenes(config.shapeworld, seed)
        records, quarantine = _shapeworld_records(scenes, config, seed), []
        ids = [r.id for r in records]
        tasks = build_task_tables(ids, scenes, config.shapeworld, config.image_size, seed)
        judge = {"judge": judge_manifest_entry(config.shapeworld, config.image_size)}
    else:
        if config.source == "manifest":
            result = load_manifest(
                config.manifest.path, config.manifest.root, config.image_size, caption_chars
            )
        else:
            result = load_coco(
                config.coco.annotations, config.coco.images, config.image_size, caption_chars
            )
        if not result.records:  # nothing to write: every row's reason in the error, any policy
            reasons = "".join(f"\n  {r}" for r in result.invalid)
            raise ValueError(
                f"data.source={config.source}: no valid documents to write "
                f"({len(result.invalid)} invalid rows){reasons}"
            )
        # the user's task files point at these documents; their bad rows join the documents'
        task_import = load_task_files(config.tasks, result.records, config.image_size)
        result.invalid.extend(task_import.invalid)
        records, quarantine = apply_invalid_policy(result, config.on_invalid)
        if quarantine:
            log.warning("%d invalid rows set aside in the quarantine table", len(quarantine))
        for note in task_import.notes:
            log.warning("%s", note)
        tasks = task_import.tables
        judge = {"task_import_notes": task_import.notes} if task_import.notes else {}
        # user data: no scene judge, the generic metrics only
    records = _with_splits(records, config, seed)
    return write_corpus(
        out_dir,
        records,
        source=config.source,
        image_size=config.image_size,
        shard_size=config.shard_size,
        tasks=tasks,
        quarantine=quarantine,
        extra=judge,
    )


def check_tracked(config: DataConfig, tracked: str | Path) -> None:
    """Refuse user data outside ``tracked``: DVC hashes only that folder as ``prepare``'s
    input, so a manifest or image folder elsewhere could change without ``dvc status`` seeing
    it, and the corpus would silently be stale. Paths are compared as written (made absolute,
    ``..`` resolved), so a symlink placed inside ``tracked`` is accepted."""
    if config.source == "manifest":
        paths = {"manifest.path": config.manifest.path, "manifest.root": config.manifest.root}
    elif config.source == "coco":
        paths = {"coco.annotations": config.coco.annotations, "coco.images": config.coco.images}
    else:
        return
    paths.update({f"tasks.{k}": v for k, v in config.tasks.files().items()})
    root = Path(os.path.abspath(tracked))
    for key, value in paths.items():
        if value is not None and not Path(os.path.abspath(value)).is_relative_to(root):
            raise ValueError(
                f"data.{key}: {value} is outside {tracked}, the folder dvc.yaml "
                "tracks as prepare's input, so a change there would not rerun the pipeline; put "
                "your data under "
                f"{tracked}/ (copy it, link it there, or `dvc import` it)"
            )


def _shapeworld_records(scenes: list[Scene], config: DataConfig, seed: int) -> list[CorpusRecord]:
    sw = config.shapeworld
    rng = np.random.default_rng([seed, 0xCA9])
    records = []
    for index, scene in enumerate(
        tqdm(scenes, desc="render ShapeWorld", unit="img", mininterval=2)
    ):
        captions = caption_scene(scene, sw.grid_size)
        records.append(
            CorpusRecord(
                id=f"sw-{index:06d}",
                split="",  # assigned by content below
                caption=captions[int(rng.integers(len(captions)))],
                captions=captions,
                image=render_scene(scene, config.image_size, sw.grid_size),
                source="shapeworld",
                objects=scene_to_json(scene),
            )
        )
    return records


def _with_splits(records: list[CorpusRecord], config: DataConfig, seed: int) -> list[CorpusRecord]:
    given = [r.split or None for r in records]
    splits = assign_splits(
        [image_sha256(r.image) for r in records], config.splits.as_dict(), seed, given
    )
    return [replace(r, split=s) for r, s in zip(records, splits, strict=True)]
