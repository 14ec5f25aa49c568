"""A project's own records of where its artifacts live: the stage commands in ``dvc.yaml``.

Paths are typed once, as the arguments of each stage's command (STYLE.md §4); tools that work
on a project's artifacts after the pipeline ran — the model CLI — read them from there rather
than retyping them, so a path changed in ``dvc.yaml`` is followed everywhere.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml


def stage_arguments(project: str | Path, stage: str) -> dict[str, str]:
    """``--name value`` options of stage ``stage``'s command in ``<project>/dvc.yaml``, keyed
    by name without the dashes (``{"vq": "models/vq", "text-tokenizer": ...}``)."""
    dvc_yaml = Path(project) / "dvc.yaml"
    try:
        stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    except (FileNotFoundError, KeyError, TypeError) as err:
        raise FileNotFoundError(f"{dvc_yaml}: no stages to read artifact paths from") from err
    if stage not in stages:
        raise ValueError(f"{dvc_yaml} has no stage {stage!r}; stages: {list(stages)}")
    words = shlex.split(stages[stage]["cmd"])
    options = {}
    for word, value in zip(words, [*words[1:], None], strict=True):
        if word.startswith("--") and value is not None and not value.startswith("--"):
            options[word[2:]] = value
    return options
