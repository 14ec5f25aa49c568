"""Instruction templates rendered to Vocab ids (CM3Leon §4, adapted to ShapeWorld).

The phrasings of each task live in its :class:`~cm3leon.tasks.TaskSpec` (``templates``); SFT
renders whole examples with them and inference renders prompts up to the output, so both see
the same layout. Every task has at least two phrasings. A template is a string in a tiny
language:

- plain text, with ``{field}`` placeholders filled from the example's text fields;
- ``<break>``: the Vocab's break token;
- ``<image:name>``: the example's image tokens ``name`` (64 VQ codes per image by default);
- ``<output>``: where the part the model must produce begins (used to restrict the loss to the
  output when asked; CM3Leon trains on the whole sequence by default).

Text segments are stripped of surrounding spaces, so ``a <break> b`` tokenizes ``a`` and ``b``
exactly as written. Captioning puts the image *before* the caption it conditions ("Describe
the given picture. <break> image <break> caption"), so generation reads the image first.
Which phrasing a run uses is an index, clamped to each task's last phrasing
(:func:`phrasing_for`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cm3leon.tasks import task as task_spec
from cm3leon.tokenizers.document import DocumentCodec

_TOKEN = re.compile(r"(<break>|<output>|<image:[a-z_]+>)")


def phrasing_for(task: str, phrasing: int) -> int:
    """``phrasing``, or the task's last phrasing when it has fewer."""
    return min(phrasing, len(task_spec(task).templates) - 1)


@dataclass(frozen=True)
class SFTExample:
    ids: list[int]
    weights: list[float]  # weight for predicting ids[j]
    output_start: int  # index of the first output token


def render(
    task: str,
    phrasing: int,
    texts: Mapping[str, str],
    images: Mapping[str, Sequence[int]],
    codec: DocumentCodec,
    loss_on_output_only: bool = False,
    mask_text: bool = False,
) -> SFTExample:
    """Render one example; ``images`` hold Vocab image ids, ``texts`` the template's fields.
    ``mask_text``: the prompt's text segments become ``<mask:0>`` as in :func:`render_prompt`
    (the output keeps its text): an example of classifier-free guidance's unconditional
    stream."""
    ids, output_start = _render(
        task, phrasing, texts, images, codec, prompt_only=False, mask_text=mask_text
    )
    ids.append(codec.vocab.eos)
    weights = [0.0 if loss_on_output_only and j < output_start else 1.0 for j in range(len(ids))]
    return SFTExample(ids=ids, weights=weights, output_start=output_start)


def render_prompt(
    task: str,
    phrasing: int,
    texts: Mapping[str, str],
    images: Mapping[str, Sequence[int]],
    codec: DocumentCodec,
    mask_text: bool = False,
) -> list[int]:
    """The template up to its ``<output>`` marker: what a model is given to do the task.

    With ``mask_text`` every text segment holding a ``{field}`` becomes one CM3 mask token
    ``<mask:0>`` — the unconditional stream of classifier-free guidance (CM3Leon §3.1).
    """
    ids, _ = _render(task, phrasing, texts, images, codec, prompt_only=True, mask_text=mask_text)
    return ids


def _render(
    task: str,
    phrasing: int,
    texts: Mapping[str, str],
    images: Mapping[str, Sequence[int]],
    codec: DocumentCodec,
    prompt_only: bool,
    mask_text: bool = False,
) -> tuple[list[int], int]:
    options = task_spec(task).templates
    if not 0 <= phrasing < len(options):
        raise ValueError(f"task {task!r} has phrasings 0..{len(options) - 1}, not {phrasing}")
    vocab = codec.vocab
    ids: list[int] = []
    output_start = None
    for part in _TOKEN.split(options[phrasing]):
        part = part.strip()
        if not part:
            continue
        if part == "<break>":
            ids.append(vocab.brk)
        elif part == "<output>":
            output_start = len(ids)
            if prompt_only:
                break
        elif part.startswith("<image:"):
            name = part[len("<image:") : -1]
            if name not in images:
                raise ValueError(f"task {task!r} needs image {name!r}; got {sorted(images)}")
            image = list(images[name])
            if not all(vocab.is_image(t) for t in image):
                raise ValueError(f"image {name!r} holds ids outside the Vocab's image range")
            ids.extend(image)
        elif mask_text and output_start is None and "{" in part:  # the prompt's text only
            ids.append(vocab.sentinel(0))
        else:
            try:
                ids.extend(codec.encode_text(part.format(**texts)))
            except KeyError as err:
                raise ValueError(
                    f"task {task!r} needs text field {err}; got {sorted(texts)}"
                ) from None
    if output_start is None:  # a template bug, caught by the tests of every template
        raise ValueError(f"template {task}/{phrasing} has no <output> marker")
    return ids, output_start
