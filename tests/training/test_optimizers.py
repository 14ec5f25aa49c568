"""Muon + AdamW (cm3leon/training/optimizers.py) and how the training loop builds it."""

import dataclasses

import pytest
import torch

from cm3leon.config import RelativeConfigError, TrainConfig
from cm3leon.model.transformer import DecoderLM, TransformerShape
from cm3leon.training.loop import optimizer
from cm3leon.training.optimizers import MuonAdamW, orthogonalize


@pytest.mark.parametrize("shape", [(64, 24), (24, 64), (32, 32)])
def test_orthogonalize_keeps_the_directions_and_evens_the_singular_values(shape):
    generator = torch.Generator().manual_seed(0)
    # a badly conditioned matrix: singular values spread over 1.5 decades (five steps lift a
    # value by at most 3.4445^5 ~ 490x: far smaller ones stay below the band)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=generator))
    k = min(shape)
    spread = torch.logspace(0, -1.5, k)
    matrix = u[:, :k] @ torch.diag(spread) @ v[:, :k].T
    out = orthogonalize(matrix)
    assert out.shape == matrix.shape
    singular = torch.linalg.svdvals(out)
    # the quintic's fixed band (Jordan et al.): about [0.7, 1.2] for all but the tiniest values
    assert singular.min() > 0.6 and singular.max() < 1.3, singular
    polar = u[:, :k] @ v[:, :k].T  # U V^T, the exact orthogonalization
    cosine = (out * polar).sum() / (out.norm() * polar.norm())
    assert cosine > 0.95
    assert torch.allclose(orthogonalize(1000 * matrix), out, atol=1e-5)  # scale-free
    with pytest.raises(ValueError, match="matrix"):
        orthogonalize(torch.ones(3))


def _random_grads(params, step):
    generator = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def test_adamw_groups_match_torch_adamw_exactly():
    torch.manual_seed(0)
    a = [torch.randn(8, 4), torch.randn(5)]
    b = [t.clone() for t in a]
    groups = lambda ps: [  # noqa: E731
        {"params": [ps[0]], "weight_decay": 0.1},
        {"params": [ps[1]], "weight_decay": 0.0},
    ]
    ours = MuonAdamW([{**g, "lr": 0.01, "betas": (0.9, 0.98)} for g in groups(a)])
    reference = torch.optim.AdamW(groups(b), lr=0.01, betas=(0.9, 0.98), foreach=False)
    for step in range(6):
        _random_grads(a, step)
        _random_grads(b, step)
        ours.step()
        reference.step()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_muon_step_is_the_orthogonalized_nesterov_momentum():
    weight = torch.randn(6, 12)
    start = weight.clone()
    opt = MuonAdamW([{"params": [weight], "muon": True, "lr": 0.02, "weight_decay": 0.0}])
    _random_grads([weight], 0)
    grad = weight.grad.clone()
    opt.step()
    # first step: momentum buffer = 0.05 g, Nesterov update = g lerp (0.05 g) by 0.95
    nesterov = grad + 0.95 * (0.05 * grad - grad)
    assert torch.allclose(weight, start - 0.02 * orthogonalize(nesterov), atol=1e-6)
    tall = torch.randn(12, 6)  # rows > cols: the rate is scaled by sqrt(rows / cols)
    t0 = tall.clone()
    opt = MuonAdamW([{"params": [tall], "muon": True, "lr": 0.02, "weight_decay": 0.0}])
    _random_grads([tall], 1)
    g = tall.grad.clone()
    opt.step()
    assert torch.allclose(tall, t0 - 0.02 * 2**0.5 * orthogonalize(0.0975 * g), atol=1e-6)


def test_state_dict_resumes_exactly():
    torch.manual_seed(1)
    params = [torch.randn(8, 16), torch.randn(16, 8), torch.randn(8)]

    def build(ps):
        return MuonAdamW(
            [
                {"params": ps[:2], "muon": True, "lr": 0.02, "weight_decay": 0.1},
                {"params": ps[2:], "lr": 0.01, "betas": (0.9, 0.98), "weight_decay": 0.0},
            ]
        )

    straight = [p.clone() for p in params]
    opt = build(straight)
    for step in range(5):
        _random_grads(straight, step)
        opt.step()
    resumed = [p.clone() for p in params]
    first = build(resumed)
    for step in range(3):
        _random_grads(resumed, step)
        first.step()
    saved = first.state_dict()
    second = build(resumed)
    second.load_state_dict(saved)
    for step in range(3, 5):
        _random_grads(resumed, step)
        second.step()
    for x, y in zip(straight, resumed, strict=True):
        assert torch.equal(x, y)


def test_a_vector_in_a_muon_group_is_refused():
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        MuonAdamW([{"params": [torch.zeros(5)], "muon": True, "lr": 0.02}])


def test_the_loop_puts_hidden_matrices_on_muon_and_the_rest_on_adamw():
    shape = TransformerShape(
        vocab_size=40, n_layer=2, n_head=2, d_model=16, max_seq_len=32, image_offset=30
    )
    model = DecoderLM(shape)
    adamw = optimizer(model, TrainConfig(optimizer="adamw"))
    assert isinstance(adamw, torch.optim.AdamW)
    muon = optimizer(model, TrainConfig(optimizer="muon", lr=0.004, muon_lr=0.03))
    assert isinstance(muon, MuonAdamW)
    on_muon = {id(p) for g in muon.param_groups if g["muon"] for p in g["params"]}
    hidden = {id(p) for p in model.hidden_matrices()}
    assert on_muon == hidden and len(hidden) == 2 * 4  # qkv, out, up, down per block
    everything = [id(p) for g in muon.param_groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())  # each once
    assert id(model.token_embedding.weight) not in on_muon
    assert id(model.head.weight) not in on_muon
    assert muon.param_groups[0]["lr"] == 0.004 and not muon.param_groups[0]["muon"]
    assert [g["lr"] for g in muon.param_groups if g["muon"]] == [0.03]


@pytest.mark.parametrize(
    ("change", "key"), [({"zero_stage": 2}, "zero_stage"), ({"precision": "bf16"}, "precision")]
)
def test_muon_refuses_flattened_parameters(change, key):
    with pytest.raises(RelativeConfigError, match=key):
        TrainConfig(optimizer="muon", **change)
    dataclasses.replace(TrainConfig(), **change)  # fine with AdamW
