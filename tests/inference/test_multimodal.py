"""MultimodalModel: task prompts, infilling and the task runner on a toy model."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from cm3leon.config import RetrievalPolicyConfig, RetrieverConfig, VQConfig
from cm3leon.decoding.selector import Strategy
from cm3leon.inference.multimodal import MultimodalModel, TaskInput
from cm3leon.model.transformer import DecoderLM, TransformerShape
from cm3leon.retrieval.dual_encoder import DualEncoder
from cm3leon.retrieval.search import MemoryBank, RetrievedDocument
from cm3leon.tokenizers.document import DocumentCodec
from cm3leon.tokenizers.text import train_text_tokenizer
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.tokenizers.vq import VQModel

VOCAB = Vocab(text_size=300, image_size=32, num_sentinels=2, num_reserved=0)
TOKENIZER = train_text_tokenizer(["a red circle at the top", "what color is it?"] * 4, 300)
IMAGE = VOCAB.image_to_vocab(list(range(16)) * 4)  # 64 codes: an 8x8 grid


def toy(kind: str) -> MultimodalModel:
    torch.manual_seed(0)
    shape = TransformerShape(VOCAB.size, n_layer=1, n_head=2, d_model=16, max_seq_len=300)
    model = DecoderLM(shape).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    vq = VQModel(VQConfig(codebook_size=32, code_dim=8, channels=(16, 16))).eval()
    codec = DocumentCodec(VOCAB, TOKENIZER, image_tokens=64)
    return MultimodalModel(model, codec, vq, kind, max_text_tokens=6)


def test_pretrain_captioning_is_infilling_and_sft_uses_the_template():
    item = TaskInput(images={"image": IMAGE})
    s0 = VOCAB.sentinel(0)
    cond, _ = toy("pretrain").prompts("captioning", item, [])
    assert cond == [VOCAB.bos, s0, VOCAB.brk, *IMAGE, s0]
    cond, uncond = toy("sft").prompts("captioning", item, [7, VOCAB.eos])
    assert cond[:3] == [VOCAB.bos, 7, VOCAB.eos] and cond[-1] == VOCAB.brk
    assert cond[-65:-1] == IMAGE
    assert uncond == cond  # no text field to mask in this template


def test_documents_retrieved_for_the_prompt_text_stay_out_of_the_unconditional_stream():
    context = [7, VOCAB.eos]
    item = TaskInput(texts={"caption": "a red circle"})
    cond, uncond = toy("pretrain").prompts("text_to_image", item, context)
    assert cond[:3] == [VOCAB.bos, *context] and cond[-1] == VOCAB.brk
    assert uncond == [VOCAB.bos, VOCAB.sentinel(0), VOCAB.brk]  # neither caption nor context
    question = TaskInput({"question": "what color is it?"}, {"image": IMAGE})
    _, uncond = toy("sft").prompts("vqa", question, context)
    assert uncond[:3] == [VOCAB.bos, *context]  # retrieved for the image, which stays too


def test_text_to_image_samples_are_whole_images_and_text_tasks_are_text():
    model = toy("sft")
    items = [TaskInput(texts={"caption": "a red circle"}), TaskInput(texts={"caption": "a"})]
    plan = [Strategy.named("top_p", cfg_weight=2.0), Strategy.named("cd_k", cfg_weight=2.0)]
    results = model.run("text_to_image", items, plan, seed=1)
    for r in results:
        assert len(r.samples) == 2 and r.strategies == ["top_p", "cd_k"]
        assert all(len(c) == 64 for c in r.sample_codes) and r.codes == r.sample_codes[0]
        assert r.rerank_scores == []  # no retriever loaded: no re-ranking
    images = model.decode_ids([VOCAB.image_to_vocab(r.codes) for r in results])
    assert images.shape == (2, model.image_size, model.image_size, 3)
    (answer,) = model.run(
        "vqa",
        [TaskInput({"question": "what color is it?"}, {"image": IMAGE})],
        [Strategy.named("greedy")],
    )
    assert all(VOCAB.is_text(t) for t in answer.samples[0]) and len(answer.samples[0]) <= 6
    assert isinstance(answer.text, str)
    with pytest.raises(ValueError, match="no memory bank"):
        model.run("text_to_image", items, plan, retrieved=2)


def test_infilling_replaces_exactly_the_span():
    model = toy("pretrain")
    caption = model.codec.encode_text("a red circle at the top")
    document = [*caption, VOCAB.brk, *IMAGE]
    start = len(caption) + 1 + 10
    filled = model.infill(document, (start, start + 5), Strategy.named("top_p"), seed=3)
    assert len(filled) == len(document)
    assert filled[:start] == document[:start] and filled[start + 5 :] == document[start + 5 :]
    assert all(VOCAB.is_image(t) for t in filled[start : start + 5])
    text_filled = model.infill(document, (1, 3), Strategy.named("greedy"))
    assert text_filled[0] == document[0] and text_filled[-65:] == document[-65:]
    assert all(VOCAB.is_text(t) for t in text_filled[1 : len(text_filled) - 65])
    with pytest.raises(ValueError, match="all text or all image"):
        model.infill(document, (len(caption) - 1, len(caption) + 2), Strategy.named("greedy"))


def test_infill_many_is_infill_in_one_batch_and_takes_one_kind_of_span():
    model = toy("pretrain")
    documents, spans = [], []
    for text in ("a red circle at the top", "what color is it?", "a red circle"):
        caption = model.codec.encode_text(text)
        documents.append([*caption, VOCAB.brk, *IMAGE])
        start = len(caption) + 1 + 16  # the middle rows of the 8x8 grid: one length for all
        spans.append((start, start + 32))
    greedy = Strategy.named("greedy")
    batched = model.infill_many(documents, spans, greedy)
    assert batched == [model.infill(d, s, greedy) for d, s in zip(documents, spans, strict=True)]
    model.batch_size = 2  # in chunks, the same (greedy draws nothing)
    assert model.infill_many(documents, spans, greedy) == batched
    with pytest.raises(ValueError, match="of one kind"):
        model.infill_many(documents[:2], [spans[0], (1, 3)], greedy)
    with pytest.raises(ValueError, match="3 documents but 2 spans"):
        model.infill_many(documents, spans[:2], greedy)


def test_pixels_round_trip_through_the_vq_ids():
    model = toy("sft")
    pixels = np.zeros((2, model.image_size, model.image_size, 3), np.uint8)
    ids = model.encode_pixels(pixels)
    assert len(ids) == 2 and all(len(i) == 64 and all(VOCAB.is_image(t) for t in i) for i in ids)


def with_bank(model: MultimodalModel) -> MultimodalModel:
    """``model`` with a real (tiny, untrained) dual encoder and a two-document memory bank."""
    torch.manual_seed(1)
    config = RetrieverConfig(
        embed_dim=8, text_width=16, text_layers=1, text_heads=2, image_channels=(8, 8)
    )
    encoder = DualEncoder(config, VOCAB.text_size, model.image_size)
    index = faiss.IndexFlatIP(8)
    index.add(np.eye(8, dtype=np.float32)[:2])
    documents = {name: ("a red circle", (VOCAB.brk, *IMAGE)) for name in ("a", "b")}
    model.bank = MemoryBank(encoder, index, ["a", "b"], documents, RetrievalPolicyConfig(), VOCAB)
    return model


def manual_log_likelihood(model: MultimodalModel, ids: list[int], start: int) -> float:
    with torch.no_grad():
        log_probs = torch.log_softmax(model.model(torch.tensor([ids])).float()[0], -1)
    return float(sum(log_probs[j - 1, ids[j]] for j in range(start, len(ids))))


def test_caption_log_likelihood_scores_the_caption_the_way_each_model_captions():
    captions = ["a red circle at the top", "what color"]
    images = [IMAGE, list(reversed(IMAGE))]
    codec = toy("sft").codec
    for kind in ("pretrain", "sft"):
        model = toy(kind)
        model.batch_size = 1  # and in one padded batch below: the right pads change nothing
        one_by_one = model.caption_log_likelihood(captions, images)
        model.batch_size = 8
        batched = model.caption_log_likelihood(captions, images)
        np.testing.assert_allclose(batched, one_by_one, rtol=1e-5)
        for caption, image, score in zip(captions, images, batched, strict=True):
            text = codec.encode_text(caption)
            if kind == "pretrain":  # CM3 infilling: <mask:0> <break> image <mask:0> caption
                head, _ = model.prompts("captioning", TaskInput(images={"image": image}), [])
                ids, start = [*head, *text, VOCAB.eos_span], len(head)
            else:  # the captioning template's prompt, then the caption and <eos>
                head, _ = model.prompts("captioning", TaskInput(images={"image": image}), [])
                ids, start = [*head, *text, VOCAB.eos], len(head)
            assert score == pytest.approx(manual_log_likelihood(model, ids, start), rel=1e-5)
        assert batched[0] != batched[1]
    with pytest.raises(ValueError, match="2 captions but 1 images"):
        model.caption_log_likelihood(captions, images[:1])


def test_reranking_adds_the_weighted_caption_likelihood_to_the_dual_encoders_logit():
    model = with_bank(toy("pretrain"))
    captioner = toy("sft")
    texts = ["a red circle", "what color is it?"]
    items = [TaskInput(texts={"caption": t}) for t in texts]
    plan = [Strategy.named("top_p")] * 3
    alone = model.run("text_to_image", items, plan, seed=1)
    retriever = model.retriever
    for item, result in zip(items, alone, strict=True):
        pixels = model.decode_ids(result.samples)
        query = VOCAB.vocab_to_text(model.codec.encode_text(item.texts["caption"]))
        cosine = retriever.embed_image(pixels) @ retriever.embed_text([query])[0]
        expected = retriever.similarity_scale * cosine
        np.testing.assert_allclose(result.rerank_scores, expected, rtol=1e-5)
        assert result.best == int(np.argmax(expected))
    model.rerank_with(captioner, 0.5)
    guided = model.run("text_to_image", items, plan, seed=1)
    for text, before, after in zip(texts, alone, guided, strict=True):
        assert after.samples == before.samples  # the same draws, only their order changes
        likelihood = captioner.caption_log_likelihood([text] * 3, after.samples)
        expected = np.asarray(before.rerank_scores) + 0.5 * likelihood
        np.testing.assert_allclose(after.rerank_scores, expected, rtol=1e-5)
        assert after.best == int(np.argmax(expected))
        assert after.codes == after.sample_codes[after.best]
    model.rerank_with(captioner, 0.0)
    assert model.captioner is None and model.caption_weight == 0.0
    with pytest.raises(ValueError, match="must be >= 0"):
        model.rerank_with(captioner, -1.0)
    other = MultimodalModel(
        captioner.model,
        DocumentCodec(Vocab(text_size=300, image_size=16), TOKENIZER, image_tokens=64),
        captioner.vq,
        "sft",
    )
    with pytest.raises(ValueError, match="vocabulary"):
        model.rerank_with(other, 1.0)


def test_given_context_documents_replace_retrieval():
    model = toy("pretrain")  # no memory bank: retrieval would fail
    document = RetrievedDocument("doc-7", "a red circle", 1.0, (VOCAB.brk, *IMAGE))
    items = [TaskInput(texts={"caption": "a red circle"})]
    (result,) = model.run(
        "text_to_image", items, [Strategy.named("greedy")], 1, documents=[[document]]
    )
    assert result.retrieved == [document]
    with pytest.raises(ValueError, match="1 inputs but 2 document lists"):
        model.run("text_to_image", items, [Strategy.named("greedy")], 1, documents=[[], []])


def test_image_log_likelihood_scores_the_image_after_the_caption():
    captions = ["a red circle at the top", "what color"]
    images = [IMAGE, list(reversed(IMAGE))]
    for kind in ("pretrain", "sft"):
        model = toy(kind)
        model.batch_size = 1
        one_by_one = model.image_log_likelihood(captions, images)
        model.batch_size = 8
        batched = model.image_log_likelihood(captions, images)
        np.testing.assert_allclose(batched, one_by_one, rtol=1e-5)
        for caption, image, score in zip(captions, images, batched, strict=True):
            head, _ = model.prompts("text_to_image", TaskInput(texts={"caption": caption}), [])
            ids = [*head, *image, VOCAB.eos]  # the caption's prompt, the image, then <eos>
            assert score == pytest.approx(manual_log_likelihood(model, ids, len(head)), rel=1e-5)


def test_several_captions_are_reranked_by_the_image_they_predict():
    model = toy("sft")
    items = [TaskInput(images={"image": IMAGE}), TaskInput(images={"image": IMAGE[::-1]})]
    plan = [Strategy.named("greedy")] + [Strategy.named("top_p", top_p=1.0)] * 3
    plain = model.run("captioning", items, plan, seed=3, rerank=False)
    ranked = model.run("captioning", items, plan, seed=3)
    for item, before, after in zip(items, plain, ranked, strict=True):
        assert after.samples == before.samples and before.best == 0
        assert before.text == before.texts[0]  # unranked: the first (greedy) caption
        expected = model.image_log_likelihood(after.texts, [item.images["image"]] * 4)
        np.testing.assert_allclose(after.rerank_scores, expected, rtol=1e-5)
        assert after.best == int(np.argmax(expected))
        assert after.text == after.texts[after.best]
    (single,) = model.run("captioning", items[:1], plan[:1])
    assert single.rerank_scores == [] and single.best == 0  # one sample: nothing to rank
    (answer,) = model.run(  # a task that does not write a caption is never re-ranked
        "vqa", [TaskInput({"question": "what color is it?"}, {"image": IMAGE})], plan
    )
    assert answer.rerank_scores == [] and answer.best == 0
