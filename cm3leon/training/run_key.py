"""Run keys: which resumable checkpoint folder a training run may continue (DESIGN.md §3).

A training stage keeps DeepSpeed checkpoints in ``<scratch>/<run key>/``. The key hashes
everything that shapes the run: the stage's config dataclass, the seed, the contents of its
input folders, the numeric mode and kernel variables of the process
(:func:`cm3leon.numerics.record`: a run checkpointed under the fast kernels never continues
under the reproducible ones), and the source of the code that trains — the import closure of
the stage script and the library entry point (:mod:`cm3leon.source_closure`), the same files
``dvc.yaml`` lists as the stage's code deps. A killed run resumes under the same key; a changed
param, input or line of training code gets a new key and trains from step 0, so ``dvc repro``
after a code change never re-exports weights that older code produced. The exported model
records the key (``config.json``: ``run_key``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cm3leon import numerics
from cm3leon.artifacts import folder_digest
from cm3leon.source_closure import source_digest


def run_key(
    config: Any, seed: int, inputs: Iterable[str | Path], code: Iterable[str | Path]
) -> str:
    """16 hex digits over ``config`` (a dataclass), ``seed``, the numeric mode, the files under
    each ``inputs`` folder and the import closure of the ``code`` entry files."""
    shaped = {"config": asdict(config), "seed": seed, "numerics": numerics.record()}
    digest = hashlib.sha256(json.dumps(shaped, sort_keys=True).encode())
    for folder in inputs:
        digest.update(folder_digest(folder).encode())
    digest.update(source_digest(code).encode())
    return digest.hexdigest()[:16]
