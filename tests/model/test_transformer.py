"""DecoderLM: the paper's architecture choices, causality, KV-cache equivalence and the
training forward on trimmed grids (``select``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cm3leon.config import ModelConfig
from cm3leon.model.transformer import (
    DecoderLM,
    KVCache,
    TransformerShape,
    rotary_angles,
    rotate,
)

SHAPE = TransformerShape(vocab_size=40, n_layer=2, n_head=2, d_model=16, max_seq_len=32)
# ids 30..39 are image ids; an image is 4 tokens
CELLS = TransformerShape(
    vocab_size=40, n_layer=2, n_head=2, d_model=16, max_seq_len=32, image_cells=4, image_offset=30
)

ROTARY = TransformerShape(**{**CELLS.to_dict(), "rotary": True})


def make_model(shape: TransformerShape = SHAPE, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(shape).eval()


def randomize(model: DecoderLM) -> DecoderLM:
    """Non-zero output projections, so the blocks actually do something."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def test_output_shape():
    model = make_model()
    ids = torch.randint(0, SHAPE.vocab_size, (3, 7))
    assert model(ids).shape == (3, 7, SHAPE.vocab_size)


def test_no_biases_and_parameter_free_norms():
    model = make_model()
    for name, _ in model.named_parameters():
        assert "bias" not in name, name
        assert "norm" not in name, name
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * SHAPE.n_layer + 1
    assert all(not m.elementwise_affine and m.weight is None and m.bias is None for m in norms)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is None for m in linears)


def test_output_projections_zero_so_blocks_are_identity_at_init():
    model = make_model()
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.out_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.down_proj.weight) == 0
    ids = torch.randint(0, SHAPE.vocab_size, (2, 9))
    with torch.no_grad():
        embeddings = model.token_embedding(ids) + model.position_embedding(torch.arange(9))
        expected = model.head(model.final_norm(embeddings))
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)


def test_truncated_normal_init_std():
    shape = TransformerShape(vocab_size=4096, n_layer=1, n_head=2, d_model=64, max_seq_len=8)
    model = make_model(shape)
    weight = model.token_embedding.weight  # 262k entries
    assert weight.abs().max() <= 2 * shape.init_std + 1e-9
    # A normal cut at +-2 std has std 0.8796 * std.
    assert weight.std().item() == pytest.approx(0.8796 * shape.init_std, rel=0.02)
    assert weight.mean().item() == pytest.approx(0.0, abs=1e-4)
    head = model.head.weight
    assert head.std().item() == pytest.approx(0.8796 * shape.init_std, rel=0.02)


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = randomize(make_model())
    ids = torch.randint(0, SHAPE.vocab_size, (2, 12))
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % SHAPE.vocab_size
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :8], after[:, :8], rtol=0, atol=0)
    assert not torch.allclose(before[:, 8:], after[:, 8:])


@pytest.mark.parametrize("shape", [SHAPE, CELLS, ROTARY], ids=["plain", "image_cells", "rotary"])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 3, 3], [4, 8], [12]])
def test_kv_cache_matches_full_forward(chunks, shape):
    model = randomize(make_model(shape))
    # half the ids image ids, so runs of them cross chunk boundaries
    ids = torch.where(
        torch.rand(3, sum(chunks), generator=torch.Generator().manual_seed(1)) < 0.5,
        torch.randint(30, 40, (3, sum(chunks))),
        torch.randint(0, 30, (3, sum(chunks))),
    )
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=3)
        pieces, position = [], 0
        for size in chunks:
            pieces.append(model(ids[:, position : position + size], kv_cache=cache))
            position += size
    assert cache.length == sum(chunks)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_rotary_scores_depend_on_the_distance_only():
    """RoPE: the score of a rotated query and key depends on their positions' difference, and
    rotation keeps every vector's length."""
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=generator)
    positions = torch.tensor([[3, 10, 40, 47]])
    cos, sin = rotary_angles(positions, 16)
    rq, rk = rotate(q.expand(1, 1, 4, 16), cos, sin), rotate(k.expand(1, 1, 4, 16), cos, sin)
    near = (rq[..., 0, :] * rk[..., 1, :]).sum()  # positions 3 and 10
    shifted = (rq[..., 2, :] * rk[..., 3, :]).sum()  # 40 and 47: the same distance
    torch.testing.assert_close(near, shifted, rtol=0, atol=1e-5)
    farther = (rq[..., 0, :] * rk[..., 3, :]).sum()  # 3 and 47
    assert not torch.isclose(near, farther, atol=1e-3)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 4), rtol=1e-5, atol=0)


def test_rotary_changes_the_model_and_needs_an_even_head_dim():
    plain, rotary = make_model(CELLS), make_model(ROTARY)
    rotary.load_state_dict(randomize(plain).state_dict())
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert not torch.allclose(plain(ids), rotary(ids))
    with pytest.raises(ValueError, match="even head_dim"):
        TransformerShape(vocab_size=8, n_layer=1, n_head=2, d_model=6, max_seq_len=4, rotary=True)
    config = ModelConfig(preset="tiny", rotary=True)
    assert TransformerShape.from_config(config, vocab_size=64).rotary


def test_cache_select_reorders_rows():
    model = randomize(make_model())
    ids = torch.randint(0, SHAPE.vocab_size, (3, 6))
    following = torch.randint(0, SHAPE.vocab_size, (4, 2))
    order = [2, 0, 0, 1]
    with torch.no_grad():
        cache = model.new_cache(batch_size=3, max_len=10)
        model(ids, kv_cache=cache)
        selected = cache.select(order)
        assert isinstance(selected, KVCache) and selected.batch_size == 4 and selected.length == 6
        stepped = model(following, kv_cache=selected)
        full = model(torch.cat([ids[order], following], dim=1))
    torch.testing.assert_close(stepped, full[:, 6:], rtol=0, atol=1e-5)
    assert cache.length == 6  # the original is untouched
    clone = cache.clone()
    clone.keys[0].zero_()
    assert cache.keys[0].abs().sum() > 0


def test_image_cells_count_runs_of_image_ids():
    model = make_model(CELLS)
    ids = torch.tensor([[1, 30, 31, 32, 33, 2, 34, 35, 36, 37, 38, 3]])
    assert model.image_runs(ids).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0]]
    # A cache continues each row's run.
    cache = model.new_cache(batch_size=1)
    model(ids[:, :3], kv_cache=cache)
    assert cache.image_run.tolist() == [2]
    assert model.image_runs(ids[:, 3:5], cache).tolist() == [[3, 4]]


def test_explicit_cells_override_the_counted_ones():
    # What CM3 training passes: the true cell of each token. Equal to the count on an intact
    # image; elsewhere the cell embedding changes the logits.
    model = randomize(make_model(CELLS))
    ids = torch.tensor([[1, 30, 31, 32, 33, 2]])
    counted = torch.tensor([[0, 1, 2, 3, 4, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cells=counted), model(ids), rtol=0, atol=0)
        moved = model(ids, cells=torch.tensor([[0, 3, 4, 1, 2, 0]]))
    assert not torch.allclose(moved[:, 1:], model(ids)[:, 1:])
    # A shape without image cells has no cell embedding and ignores them.
    plain = make_model()
    assert plain.cell_embedding is None
    torch.testing.assert_close(plain(ids, cells=counted), plain(ids))


def test_exceeding_max_seq_len_raises():
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, SHAPE.max_seq_len + 1, dtype=torch.long))
    cache = model.new_cache(batch_size=1)
    model(torch.zeros(1, SHAPE.max_seq_len - 2, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    small = model.new_cache(batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=small)


def test_shape_round_trip_and_rebuild():
    data = SHAPE.to_dict()
    assert TransformerShape.from_dict(data) == SHAPE
    model = make_model()
    rebuilt = DecoderLM(TransformerShape.from_dict(data))
    rebuilt.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="unknown TransformerShape key"):
        TransformerShape.from_dict({**data, "dropout": 0.1})
    with pytest.raises(ValueError, match="divisible"):
        TransformerShape(vocab_size=4, n_layer=1, n_head=3, d_model=16, max_seq_len=8)
    # Checkpoints from before image cells have no such keys: they load as shapes without.
    old = {k: v for k, v in data.items() if k not in ("image_cells", "image_offset")}
    assert TransformerShape.from_dict(old) == SHAPE
    assert TransformerShape.from_dict(CELLS.to_dict()) == CELLS
    with pytest.raises(ValueError, match="image_offset inside the vocabulary"):
        TransformerShape(vocab_size=4, n_layer=1, n_head=1, d_model=8, max_seq_len=8, image_cells=2)


def test_shape_from_config():
    shape = TransformerShape.from_config(ModelConfig(preset="tiny", d_model=64), vocab_size=99)
    assert shape == TransformerShape(
        vocab_size=99, n_layer=2, n_head=2, d_model=64, max_seq_len=384, init_std=0.006
    )
    config = ModelConfig(preset="tiny", image_positions=True)
    shape = TransformerShape.from_config(config, 99, image_offset=90, image_tokens=64)
    assert (shape.image_cells, shape.image_offset) == (64, 90)
    with pytest.raises(ValueError, match="tokens per image"):
        TransformerShape.from_config(config, 99)


def test_parameter_count_and_flops_per_token():
    model = make_model()
    # Per block: qkv 16*48 + out 16*16 + up 16*64 + down 64*16 = 12 * 16^2 = 3072.
    blocks, head = 2 * 3072, 40 * 16
    token_embedding, position_embedding = 40 * 16, 32 * 16
    assert model.num_parameters() == blocks + head + token_embedding + position_embedding
    assert model.num_parameters(exclude_embeddings=True) == blocks + head == 6784
    # 6 N + 12 L d T with N = 6784, L = 2, d = 16, T = 32.
    assert model.flops_per_token(32) == 6 * 6784 + 12 * 2 * 16 * 32 == 52992
    # The cell embedding is a lookup table: no matmul, so not in N.
    cells = make_model(CELLS)
    assert cells.num_parameters() == model.num_parameters() + 5 * 16
    assert cells.num_parameters(exclude_embeddings=True) == 6784


def right_padded(lengths: list[int], T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (text and image) in right-padded rows of ``lengths`` and their real mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (len(lengths), T), generator=generator)
    real = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~real, 0), real


@pytest.mark.parametrize("shape", [SHAPE, CELLS, ROTARY], ids=["plain", "cells", "rotary"])
@pytest.mark.parametrize("lengths", [[9, 3, 7, 12, 1, 12, 5], [12, 11, 4, 2, 2]])
def test_selected_logits_equal_the_padded_forward_at_those_positions(shape, lengths):
    # rows in any order (sorted or not) and any number of attention grids: the real tokens'
    # logits are the padded forward's, and padding changes nothing
    model = randomize(make_model(shape))
    ids, real = right_padded(lengths, 12)
    select = real & (torch.rand(real.shape, generator=torch.Generator().manual_seed(1)) < 0.7)
    with torch.no_grad():
        padded = model(ids)[select]
        selected = model(ids, real=real, select=select)
        other_pads = model(ids.masked_fill(~real, 7), real=real, select=select)
        all_real = model(ids, select=torch.ones_like(real))
    assert selected.shape == (int(select.sum()), shape.vocab_size)
    torch.testing.assert_close(selected, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_pads, selected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_real, model(ids).flatten(0, 1), rtol=1e-5, atol=1e-5)


def test_selected_logits_gradients_match_the_padded_forward():
    lengths = [12, 10, 7, 7, 3]
    ids, real = right_padded(lengths, 12)
    grads = []
    for unpadded in (False, True):
        model = randomize(make_model(ROTARY)).train()
        logits = model(ids, real=real, select=real) if unpadded else model(ids)[real]
        (logits.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_selected_logits_errors():
    ids, real = right_padded([5, 4, 2, 1, 1], 6)
    model = make_model()
    with pytest.raises(ValueError, match="outside real"):
        model(ids, real=real, select=torch.ones_like(real))
    with pytest.raises(ValueError, match="no kv_cache"):
        model(ids, kv_cache=model.new_cache(5), real=real, select=real)
