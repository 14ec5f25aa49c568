"""Task mixing for multi-task SFT (CM3Leon §4: tasks are up- or down-sampled to set ratios).

Each sample first draws a task with probability proportional to its weight (tasks with no
examples are skipped), then an example of that task uniformly. The draw for sample ``n`` comes
from a generator keyed by ``(seed, n)``, so the stream is the same for any process split and
after a resume — the same contract as pretraining's sample stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaskMixture:
    sizes: dict[str, int]  # examples per task
    weights: dict[str, float]  # relative sampling weight per task

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(self.sizes)
        if unknown:
            raise ValueError(f"mixing weights for unknown tasks {sorted(unknown)}")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("mixing weights must be >= 0")
        if not self.probabilities():
            raise ValueError("no task has both a positive weight and examples")

    def probabilities(self) -> dict[str, float]:
        """Normalized task probabilities over tasks that have examples."""
        usable = {t: w for t, w in self.weights.items() if w > 0 and self.sizes.get(t, 0) > 0}
        total = sum(usable.values())
        return {t: w / total for t, w in sorted(usable.items())} if total else {}

    def sample(self, n: int, seed: int) -> tuple[str, int]:
        """(task, example index) of sample number ``n``."""
        probabilities = self.probabilities()
        tasks = list(probabilities)
        rng = np.random.default_rng([seed, 5, n])
        task = tasks[int(rng.choice(len(tasks), p=list(probabilities.values())))]
        return task, int(rng.integers(self.sizes[task]))


def mixture(sizes: Mapping[str, int], weights: Mapping[str, float]) -> TaskMixture:
    return TaskMixture(dict(sizes), dict(weights))
