"""Task mixing for multi-task SFT (CM3Leon §4: tasks are up- or down-sampled to set ratios).

Each sample first draws a task with probability proportional to its weight (tasks with no
examples are skipped), then an example of that task uniformly. The draw for sample ``n`` comes
from a generator keyed by ``(seed, n)``, so the stream is the same for any process split and
after a resume — the same contract as pretraining's sample stream.

With length groups (``train.length_grouping``: tasks keyed by a group, e.g. their image count)
an optimizer step first draws one group with the summed weight of its tasks, keyed by
``(seed, step)``, and each of its samples draws a task within that group: every task keeps its
share of the samples, but a step's examples have about one length and the batch pads little.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaskMixture:
    sizes: dict[str, int]  # examples per task
    weights: dict[str, float]  # relative sampling weight per task
    groups: dict[str, int] | None = None  # length group per task; None: no grouping

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(self.sizes)
        if unknown:
            raise ValueError(f"mixing weights for unknown tasks {sorted(unknown)}")
        if self.groups is not None and set(self.groups) != set(self.sizes):
            raise ValueError("length groups must name exactly the tasks that have sizes")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("mixing weights must be >= 0")
        if not self.probabilities():
            raise ValueError("no task has both a positive weight and examples")

    def probabilities(self) -> dict[str, float]:
        """Normalized task probabilities over tasks that have examples."""
        usable = {t: w for t, w in self.weights.items() if w > 0 and self.sizes.get(t, 0) > 0}
        total = sum(usable.values())
        return {t: w / total for t, w in sorted(usable.items())} if total else {}

    def group_of(self, step: int, seed: int) -> int | None:
        """The length group optimizer step ``step`` draws its samples from (None: no groups)."""
        if self.groups is None:
            return None
        mass: dict[int, float] = {}
        for task, p in self.probabilities().items():
            mass[self.groups[task]] = mass.get(self.groups[task], 0.0) + p
        keys = sorted(mass)
        rng = np.random.default_rng([seed, 6, step])
        return keys[int(rng.choice(len(keys), p=[mass[k] for k in keys]))]

    def sample(self, n: int, seed: int, group: int | None = None) -> tuple[str, int]:
        """(task, example index) of sample number ``n``, within length ``group`` if given."""
        probabilities = self.probabilities()
        if group is not None:
            probabilities = {t: p for t, p in probabilities.items() if self.groups[t] == group}
            total = sum(probabilities.values())
            probabilities = {t: p / total for t, p in probabilities.items()}
        tasks = list(probabilities)
        rng = np.random.default_rng([seed, 5, n])
        task = tasks[int(rng.choice(len(tasks), p=list(probabilities.values())))]
        return task, int(rng.integers(self.sizes[task]))


def mixture(
    sizes: Mapping[str, int],
    weights: Mapping[str, float],
    groups: Mapping[str, int] | None = None,
) -> TaskMixture:
    return TaskMixture(dict(sizes), dict(weights), None if groups is None else dict(groups))
