"""The decoding strategies by name: which logit processors each one chains (DESIGN.md §9).

This table is the one place that names strategies; the config (``evaluate.decoding``), the
CLI's ``--strategy`` choices and :class:`~cm3leon.decoding.selector.Strategy` read it. Each
strategy is a chain of processor keys, applied in order to the conditional logits (keys are
built into processors from the decoding config by ``processors.PROCESSORS``):

- ``top_p``: CFG -> temperature -> top-p -> sample;
- ``cd_k``: CFG -> CD-K against the unconditional stream -> temperature -> sample from the head;
- ``greedy``: CFG -> argmax.

A *sample plan* assigns strategies to the samples of one prompt: a strategy's own name draws
every sample with it, ``mix`` alternates top-p and CD-K (CM3Leon §3). Adding a strategy is one
processor (:mod:`cm3leon.decoding.processors`, with its ``from_config`` and ``PROCESSORS``
key), its config key (``DecodingConfig``), and a row here.
"""

from __future__ import annotations

STRATEGIES: dict[str, tuple[str, ...]] = {
    "top_p": ("cfg", "temperature", "top_p"),
    "cd_k": ("cfg", "cd_k", "temperature"),
    "greedy": ("cfg",),
}
ARGMAX = frozenset({"greedy"})  # strategies that take the best token instead of sampling
SAMPLE_PLANS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in STRATEGIES},
    "mix": ("top_p", "cd_k"),  # sample s uses entry s % len
}
