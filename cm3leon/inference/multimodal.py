"""The trained model as a tool: text-to-image, captioning, VQA, editing, grounding, segmentation.

:class:`MultimodalModel` bundles an exported transformer (``models/pretrain`` or ``models/sft``)
with the VQ tokenizer, the text tokenizer and optionally the memory bank, and turns task inputs
into prompts, prompts into generations (:func:`~cm3leon.decoding.generation.generate`) and
generations back into images or text.

Prompts (CM3Leon §3-4):

- every task uses its instruction template (:mod:`cm3leon.tokenizers.templates`, phrasings in
  the task registry :mod:`cm3leon.tasks`) up to the output;
  for text-to-image and grounding that is exactly the pretraining document format
  ``caption <break>`` followed by the image;
- captioning with the *pretrain* model, never taught the instruction, is CM3 infilling: the
  caption is replaced by ``<mask:0>`` and the model writes ``<mask:0> caption <eos_span>``;
- with ``retrieved > 0`` the prompt is prefixed by that many memory-bank documents, each
  followed by ``<eos>``, retrieved for the prompt text (text-to-image, grounding) or the input
  image (other tasks); their ids, captions and scores are returned as provenance;
- the unconditional stream of CFG / CD-K is the same prompt with each text field replaced by
  the CM3 mask token ``<mask:0>``. The bare ``<mask>`` special is never seen in training, so the
  sentinel that the causal-masked objective trains on is the mask that carries meaning. Documents
  retrieved *for the prompt text* are part of the condition and stay out of the unconditional
  stream too: kept there, they make guidance push away from what they show, i.e. from the
  prompted scene (documents retrieved for an input image stay, as the image does).

``samples`` per input are drawn with the given strategies (one per sample, so a list mixes
them); image samples of a task drawn from a document's caption (text-to-image,
:attr:`~cm3leon.tasks.TaskSpec.reranked`) are re-ranked against the prompt's text (CLIP
re-ranking, CM3Leon §3) by :meth:`MultimodalModel.rerank_scores`; other tasks keep their
first sample: the dual encoder's logit
``s cos(text, image)`` (its learned scale ``s``), plus, with a captioner set
(:meth:`MultimodalModel.rerank_with`), ``w log p(text | image)`` under the captioner's decoder.
The second term is this project's addition to the paper's recipe: with the SFT model as the
captioner and ``w = 0.5`` it lifts text-to-image accuracy by +0.044 [+0.025, +0.063] (the
pretrained model's samples) and +0.028 [+0.010, +0.046] (the SFT model's), paired on the same
800 prompts x 8 samples (``benchmarks/reranking.py``, README): the dual encoder, a small CNN,
tells shapes apart worse than a decoder that reads the image token by token. Several caption
samples (captioning) are re-ranked the other way round, by ``log p(image | caption)`` under
the captioning model's own text-to-image template: the caption that makes the input picture
most likely (SFT captioning 0.885 greedy -> 0.949 [0.931, 0.962] with 8 samples,
``benchmarks/caption_reranking.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cm3leon.decoding.generation import GenerationRequest, generate
from cm3leon.decoding.processors import ModalityConstraint
from cm3leon.decoding.selector import Strategy
from cm3leon.model.io import load_decoder
from cm3leon.retrieval.dual_encoder import DualEncoder
from cm3leon.retrieval.search import MemoryBank, RetrievedDocument, context_ids
from cm3leon.tasks import task as task_spec
from cm3leon.tokenizers.document import DocumentCodec
from cm3leon.tokenizers.templates import phrasing_for, render, render_prompt
from cm3leon.tokenizers.text import load_text_tokenizer
from cm3leon.tokenizers.tokens import read_tokens_manifest
from cm3leon.tokenizers.vq_training import decode_codes, encode_images, load_vq


@dataclass
class TaskInput:
    """One input: the template's text fields and images (Vocab image ids), and for retrieval by
    image the input picture as ``(H, W, 3)`` uint8."""

    texts: Mapping[str, str] = field(default_factory=dict)
    images: Mapping[str, Sequence[int]] = field(default_factory=dict)
    pixels: np.ndarray | None = None


@dataclass
class Generation:
    task: str
    samples: list[list[int]]  # generated Vocab ids of each sample
    strategies: list[str]
    best: int  # the sample chosen (re-ranked for text-to-image images and captions, else 0)
    rerank_scores: list[float]
    retrieved: list[RetrievedDocument]
    text: str | None = None  # decoded best sample, text tasks
    texts: list[str] = field(default_factory=list)  # every decoded sample, text tasks
    codes: list[int] | None = None  # VQ codes of the best sample, image tasks
    sample_codes: list[list[int]] = field(default_factory=list)


class MultimodalModel:
    def __init__(
        self,
        model,
        codec: DocumentCodec,
        vq,
        kind: str,
        bank: MemoryBank | None = None,
        phrasing: int = 0,
        batch_size: int = 256,
        max_text_tokens: int = 48,
        device: str = "cpu",
    ) -> None:
        model = model.to(device)  # the transformer runs there; VQ and retriever stay on CPU
        self.model, self.codec, self.vq, self.kind, self.bank = model, codec, vq, kind, bank
        self.captioner: MultimodalModel | None = None  # see rerank_with()
        self.caption_weight = 0.0
        self.fingerprint: str | None = None  # the model folder's, set by load()
        self.vocab = codec.vocab
        self.phrasing, self.batch_size, self.max_text_tokens = phrasing, batch_size, max_text_tokens
        self.image_size = int(
            decode_codes(vq, np.zeros((1, codec.image_tokens), np.int64)).shape[1]
        )

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        vq_dir: str | Path,
        text_dir: str | Path,
        tokens_dir: str | Path,
        retriever_dir: str | Path | None = None,
        retrieval_dir: str | Path | None = None,
        **kwargs,
    ) -> MultimodalModel:
        model, vocab, meta, fingerprint = load_decoder(model_dir)
        vq, vq_fingerprint = load_vq(vq_dir)
        manifest = read_tokens_manifest(tokens_dir)
        if meta.get("tokens_vq_fingerprint") not in (None, vq_fingerprint):
            raise ValueError(
                f"{model_dir} was trained on images coded by VQ {meta['tokens_vq_fingerprint']} "
                f"but {vq_dir} is {vq_fingerprint}: its image ids would mean other pictures"
            )
        codec = DocumentCodec(vocab, load_text_tokenizer(text_dir), manifest["image_tokens"])
        bank = None
        if retriever_dir is not None and retrieval_dir is not None:
            bank = MemoryBank.load(retriever_dir, retrieval_dir, tokens_dir)
        loaded = cls(model, codec, vq, meta.get("stage", "pretrain"), bank, **kwargs)
        loaded.fingerprint = fingerprint
        return loaded

    @property
    def retriever(self) -> DualEncoder | None:
        return None if self.bank is None else self.bank.retriever

    def rerank_with(self, captioner: MultimodalModel | None, weight: float) -> None:
        """Re-rank image samples by the dual encoder's logit plus ``weight`` times the caption
        log-likelihood :meth:`caption_log_likelihood` under ``captioner`` (this model itself,
        or another one over the same vocabulary, e.g. the SFT model for every generator of an
        evaluation); ``None`` or weight 0: the dual encoder alone."""
        if weight < 0:
            raise ValueError(f"the caption weight must be >= 0, got {weight}")
        if captioner is not None and captioner.vocab != self.vocab:
            raise ValueError(
                f"the captioner's vocabulary {captioner.vocab} is not this model's {self.vocab}"
            )
        self.captioner = captioner if weight > 0 else None
        self.caption_weight = weight if captioner is not None else 0.0

    # --- images <-> ids -------------------------------------------------------------------------
    def encode_pixels(self, images: np.ndarray) -> list[list[int]]:
        """``(N, H, W, 3)`` uint8 at the tokenizer's size -> Vocab image ids."""
        codes = encode_images(self.vq, images, self.batch_size, desc="vq encode")
        return [self.vocab.image_to_vocab(c.tolist()) for c in codes]

    def decode_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Vocab image ids -> ``(N, H, W, 3)`` uint8."""
        if not ids:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        codes = np.asarray([self.vocab.vocab_to_image(i) for i in ids], dtype=np.int64)
        return decode_codes(self.vq, codes, self.batch_size)

    # --- prompts --------------------------------------------------------------------------------
    def prompts(
        self, task: str, item: TaskInput, context: list[int]
    ) -> tuple[list[int], list[int]]:
        """``(conditional, unconditional)`` prompt ids for one input."""
        vocab = self.vocab
        if task == "captioning" and self.kind == "pretrain":
            image = list(item.images["image"])
            cond = [vocab.bos, *context, vocab.sentinel(0), vocab.brk, *image, vocab.sentinel(0)]
            return cond, cond
        args = (task, phrasing_for(task, self.phrasing), item.texts, item.images, self.codec)
        cond = [vocab.bos, *context, *render_prompt(*args)]
        uncond_context = [] if task_spec(task).query is not None else context
        uncond = [vocab.bos, *uncond_context, *render_prompt(*args, mask_text=True)]
        return cond, uncond

    def constraint(self, task: str) -> tuple[ModalityConstraint, int]:
        vocab, grid = self.vocab, self.codec.image_tokens
        if task_spec(task).output == "image":
            return ModalityConstraint(vocab, grid, "image", (vocab.eos,)), grid + 1
        stop = vocab.eos_span if (task == "captioning" and self.kind == "pretrain") else vocab.eos
        return ModalityConstraint(vocab, grid, "text", (stop,)), self.max_text_tokens

    # --- the task runner ------------------------------------------------------------------------
    def run(
        self,
        task: str,
        items: Sequence[TaskInput],
        strategies: Sequence[Strategy],
        retrieved: int = 0,
        seed: int = 0,
        rerank: bool = True,
        documents: Sequence[Sequence[RetrievedDocument]] | None = None,
    ) -> list[Generation]:
        """Generate ``len(strategies)`` samples for every input (sample ``s`` uses strategy
        ``s``); returns one :class:`Generation` per input. ``documents``: each input's context
        documents, given instead of ``retrieved`` ones from the memory bank (a probe's choice)."""
        if not strategies:
            raise ValueError("need at least one strategy (one per sample)")
        if documents is None:
            documents = self._retrieve(task, items, retrieved)
        elif len(documents) != len(items):
            raise ValueError(f"{len(items)} inputs but {len(documents)} document lists")
        documents = [list(d) for d in documents]
        constraint, max_new = self.constraint(task)
        requests = []
        for item, docs in zip(items, documents, strict=True):
            cond, uncond = self.prompts(task, item, context_ids(docs, self.vocab.eos))
            requests += [GenerationRequest(cond, s, uncond) for s in strategies]
        outputs: list[list[int]] = []
        self.model.eval()
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            outputs += generate(self.model, self.vocab, chunk, constraint, max_new, seed + start)
        n = len(strategies)
        results = []
        for i, docs in enumerate(documents):
            samples = outputs[i * n : (i + 1) * n]
            results.append(Generation(task, samples, [s.name for s in strategies], 0, [], docs))
        if task_spec(task).output == "image":
            self._finish_images(task, items, results, rerank)
        else:
            self._finish_texts(task, items, results, rerank)
        return results

    def infill(
        self,
        document: Sequence[int],
        span: tuple[int, int],
        strategy: Strategy,
        context: Sequence[int] = (),
        seed: int = 0,
    ) -> list[int]:
        """Regenerate ``document[start:end]`` with both sides in view (CM3 infilling).

        ``document`` is ``caption <break> image`` in Vocab ids; the span must lie inside the
        caption or inside the image. The prompt is ``<bos> context doc[:start] <mask:0>
        doc[end:] <mask:0>`` and the model writes the span until ``<eos_span>``: an image span
        gets exactly ``end - start`` image ids, a text span text ids. Returns the document with
        the span replaced.
        """
        return self.infill_many([document], [span], strategy, [context], seed)[0]

    def infill_many(
        self,
        documents: Sequence[Sequence[int]],
        spans: Sequence[tuple[int, int]],
        strategy: Strategy,
        contexts: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
    ) -> list[list[int]]:
        """:meth:`infill` for many documents in batches of ``batch_size``; every span must be
        of one kind (all text, or all image spans of one length)."""
        if len(spans) != len(documents):
            raise ValueError(f"{len(documents)} documents but {len(spans)} spans")
        contexts = [()] * len(documents) if contexts is None else contexts
        vocab, kinds, requests = self.vocab, set(), []
        for document, (start, end), context in zip(documents, spans, contexts, strict=True):
            document = list(document)
            if not 0 <= start < end <= len(document):
                raise ValueError(
                    f"span {(start, end)} is not inside the document of {len(document)} tokens"
                )
            region = document[start:end]
            if all(vocab.is_image(t) for t in region):
                kinds.add(("image", end - start))
            elif all(vocab.is_text(t) for t in region):
                kinds.add(("text", None))
            else:
                raise ValueError("an infilled span must be all text or all image tokens")
            sentinel = vocab.sentinel(0)
            prompt = [vocab.bos, *context, *document[:start], sentinel, *document[end:], sentinel]
            requests.append(GenerationRequest(prompt, strategy, prompt))  # no unconditional
        if len(kinds) != 1:
            raise ValueError(f"spans of one call must be of one kind, got {sorted(kinds)}")
        ((output, length),) = kinds
        constraint = ModalityConstraint(
            vocab, self.codec.image_tokens, output, (vocab.eos_span,), length
        )
        max_new = (length or self.max_text_tokens) + 1
        self.model.eval()
        filled: list[list[int]] = []
        for first in range(0, len(requests), self.batch_size):
            chunk = requests[first : first + self.batch_size]
            filled += generate(self.model, vocab, chunk, constraint, max_new, seed + first)
        return [
            [*d[:start], *f, *d[end:]]
            for d, (start, end), f in zip(documents, spans, filled, strict=True)
        ]

    # --- scoring -------------------------------------------------------------------------------
    def caption_log_likelihood(
        self, captions: Sequence[str], images: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """``log p(caption | image)`` under this decoder for each pair (Vocab image ids), the
        way it captions: an SFT model through its captioning template (the caption is the
        output, ``<eos>`` included), a pretrained one through CM3 infilling (``<mask:0>
        <break> image <mask:0>`` then the caption and ``<eos_span>``)."""
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions but {len(images)} images")
        vocab = self.vocab
        sequences, spans = [], []
        for caption, image in zip(captions, images, strict=True):
            image = list(image)
            if self.kind == "pretrain":
                head, _ = self.prompts("captioning", TaskInput(images={"image": image}), [])
                text = self.codec.encode_text(caption)
                sequences.append([*head, *text, vocab.eos_span])
                spans.append((len(head), len(text) + 1))
            else:
                example = render(
                    "captioning",
                    phrasing_for("captioning", self.phrasing),
                    {"caption": caption},
                    {"image": image},
                    self.codec,
                )
                ids = [vocab.bos, *example.ids]
                start = 1 + example.output_start
                sequences.append(ids)
                spans.append((start, len(ids) - start))
        return self._output_log_likelihood(sequences, spans)

    def image_log_likelihood(
        self, captions: Sequence[str], images: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """``log p(image | caption)`` under this decoder for each pair (Vocab image ids), through
        the text-to-image template (for a pretrained model phrasing 0 is its document format,
        ``caption <break> image``): the image ids and the closing ``<eos>``."""
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions but {len(images)} images")
        phrasing = phrasing_for("text_to_image", self.phrasing)
        sequences, spans = [], []
        for caption, image in zip(captions, images, strict=True):
            example = render(
                "text_to_image", phrasing, {"caption": caption}, {"image": list(image)}, self.codec
            )
            ids = [self.vocab.bos, *example.ids]
            start = 1 + example.output_start
            sequences.append(ids)
            spans.append((start, len(ids) - start))
        return self._output_log_likelihood(sequences, spans)

    def _output_log_likelihood(
        self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
    ) -> np.ndarray:
        """Sum of ``log p`` of ``sequence[start : start + count]`` for each sequence and its
        ``(start, count)``, in right-padded batches of ``batch_size`` (causal: the pads are
        unseen)."""
        vocab = self.vocab
        scores = np.zeros(len(sequences))
        device = next(self.model.parameters()).device
        self.model.eval()
        with torch.no_grad():
            for lo in range(0, len(sequences), self.batch_size):
                chunk = [list(q) for q in sequences[lo : lo + self.batch_size]]
                longest = max(len(q) for q in chunk)
                ids = torch.tensor([q + [vocab.pad] * (longest - len(q)) for q in chunk])
                logits = self.model(ids.to(device)).float()
                for j, sequence in enumerate(chunk):
                    start, count = spans[lo + j]
                    targets = torch.tensor(sequence[start : start + count], device=device)
                    rows = F.log_softmax(logits[j, start - 1 : start - 1 + count], -1)
                    scores[lo + j] = float(rows.gather(1, targets[:, None]).sum())
        return scores

    def rerank_scores(
        self, texts: Sequence[str], samples: Sequence[Sequence[Sequence[int]]]
    ) -> np.ndarray:
        """``(inputs, samples)`` re-ranking scores of image samples (Vocab ids) against each
        input's text: ``s cos(text, image)`` in the dual encoder's space, plus
        ``caption_weight * log p(text | image)`` under the captioner when one is set. Each
        sample is scored alone, so the best of a prefix of samples is the choice a run drawing
        only that prefix makes."""
        if self.retriever is None:
            raise ValueError("re-ranking needs the dual encoder: load the memory bank")
        counts = {len(s) for s in samples}
        if len(counts) != 1:
            raise ValueError(f"every input needs the same number of samples, got {counts}")
        (n,) = counts
        flat = [image for group in samples for image in group]
        image_emb = self.retriever.embed_image(self.decode_ids(flat)).reshape(len(texts), n, -1)
        queries = [self.vocab.vocab_to_text(self.codec.encode_text(t)) for t in texts]
        text_emb = self.retriever.embed_text(queries)
        scores = self.retriever.similarity_scale * np.einsum("psd,pd->ps", image_emb, text_emb)
        if self.captioner is not None:
            repeated = [t for t in texts for _ in range(n)]
            likelihood = self.captioner.caption_log_likelihood(repeated, flat)
            scores = scores + self.caption_weight * likelihood.reshape(len(texts), n)
        return scores

    def _retrieve(self, task: str, items: Sequence[TaskInput], k: int) -> list[list]:
        if k == 0:
            return [[] for _ in items]
        if self.bank is None:
            raise ValueError("retrieval asked for but no memory bank was loaded")
        query = task_spec(task).query
        if query is not None:
            texts = [self.codec.encode_text(i.texts[query]) for i in items]
            return self.bank.retrieve_text(texts, k)
        pixels = [i.pixels for i in items]
        if any(p is None for p in pixels):
            pixels = list(self.decode_ids([i.images["image"] for i in items]))
        return self.bank.retrieve_image(np.stack(pixels), k)

    def _finish_texts(self, task, items, results, rerank: bool) -> None:
        """Decode the best text sample. A task that writes a caption
        (:attr:`~cm3leon.tasks.TaskSpec.writes_caption`) re-ranks several samples by how likely
        each makes the input image, ``log p(image | caption)`` (:meth:`image_log_likelihood`)."""
        for r in results:
            r.texts = [self.codec.decode_text(s).strip() for s in r.samples]
        if rerank and task_spec(task).writes_caption and len(results[0].samples) > 1:
            n = len(results[0].samples)
            captions = [t for r in results for t in r.texts]
            images = [list(i.images["image"]) for i in items for _ in range(n)]
            scores = self.image_log_likelihood(captions, images).reshape(len(results), n)
            for r, row in zip(results, scores, strict=True):
                r.rerank_scores = [float(x) for x in row]
                r.best = int(np.argmax(row))
        for r in results:
            r.text = r.texts[r.best]

    def _finish_images(self, task, items, results, rerank: bool) -> None:
        for r in results:
            r.sample_codes = [self.vocab.vocab_to_image(s) for s in r.samples]
        spec = task_spec(task)
        use_rerank = rerank and spec.reranked and self.retriever is not None
        if use_rerank and len(results[0].samples) > 1:
            texts = [i.texts[spec.query] for i in items]
            scores = self.rerank_scores(texts, [r.samples for r in results])
            for r, row in zip(results, scores, strict=True):
                r.rerank_scores = [float(x) for x in row]
                r.best = int(np.argmax(row))
        for r in results:
            r.codes = r.sample_codes[r.best]


def rerank_prefix(generation: Generation, samples: int) -> int:
    """Best sample among the first ``samples`` (the samples-per-prompt study reuses one run)."""
    if not generation.rerank_scores:
        return 0
    return int(np.argmax(generation.rerank_scores[:samples]))


def first_samples(generation: Generation, samples: int) -> Generation:
    """``generation`` as if only its first ``samples`` samples had been drawn: those samples,
    the best of them by the re-ranker's scores (each sample is scored alone, so the choice is
    the one a run of ``samples`` would make on the same samples)."""
    if not 1 <= samples <= len(generation.samples):
        raise ValueError(f"need 1..{len(generation.samples)} samples, got {samples}")
    best = rerank_prefix(generation, samples)
    codes = generation.sample_codes[:samples]
    return dataclasses.replace(
        generation,
        samples=generation.samples[:samples],
        strategies=generation.strategies[:samples],
        best=best,
        rerank_scores=generation.rerank_scores[:samples],
        sample_codes=codes,
        codes=codes[best] if codes else generation.codes,
    )
