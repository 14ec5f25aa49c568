"""VQ tokenizer: exact quantization on a hand-made codebook, shapes, EMA/restarts, persistence."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from cm3leon.config import VQConfig, VQTrainConfig
from cm3leon.tokenizers.vq import (
    VectorQuantizer,
    VQModel,
    hilbert_order,
    psnr,
    to_model_input,
    to_uint8,
)
from cm3leon.tokenizers.vq_training import (
    codebook_statistics,
    decode_codes,
    encode_images,
    load_vq,
    mask_iou,
    save_vq,
    train_vq,
)

TINY = VQConfig(codebook_size=8, code_dim=4, channels=(8, 16), num_res_blocks=1)


def hand_made_quantizer() -> VectorQuantizer:
    quantizer = VectorQuantizer(VQConfig(codebook_size=4, code_dim=2, channels=(8,)))
    quantizer.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    return quantizer.eval()


def test_quantizer_picks_the_nearest_code_exactly():
    quantizer = hand_made_quantizer()
    points = torch.tensor([[0.1, -0.1], [0.9, 0.2], [0.2, 0.7], [-0.6, -0.5], [0.6, 0.55]])
    assert quantizer.nearest(points).tolist() == [0, 1, 2, 3, 1]
    # (B=1, D=2, h=1, w=5) latents -> codes and quantized latents equal to the codebook rows
    z = points.t().reshape(1, 2, 1, 5)
    latents, codes, commit = quantizer(z)
    assert codes.tolist() == [[[0, 1, 2, 3, 1]]]
    assert torch.equal(latents[0, :, 0].t(), quantizer.codebook[codes[0, 0]])
    expected = ((points - quantizer.codebook[codes[0, 0]]) ** 2).mean()
    assert commit.item() == pytest.approx(expected.item())


def test_straight_through_gradient_reaches_the_encoder_output():
    quantizer = hand_made_quantizer()
    z = torch.tensor([[[[0.2]], [[0.1]]]], requires_grad=True)  # (1, 2, 1, 1)
    latents, _, _ = quantizer(z)
    latents.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_ema_update_moves_codes_and_restarts_dead_ones():
    config = VQConfig(codebook_size=4, code_dim=2, channels=(8,), restart_threshold=0.5)
    quantizer = VectorQuantizer(config).train()
    quantizer.codebook.copy_(torch.tensor([[0.8, 0.8], [-0.8, -0.8], [50.0, 50.0], [-50.0, 50.0]]))
    quantizer.ema_sum.copy_(quantizer.codebook)
    quantizer.ema_count.fill_(1.0)
    points = torch.tensor([[1.0, 1.0]] * 8 + [[-1.0, -1.0]] * 8)  # two clusters
    z = points.t().reshape(1, 2, 4, 4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        quantizer(z, generator)
    # the far-away codes were never used, decayed below the threshold and restarted on data
    for code in quantizer.codebook:
        assert min((code - p).norm() for p in points[[0, 8]]) < 0.1
    # and each cluster is represented by some code that sits on its mean
    for centre in points[[0, 8]]:
        assert min((code - centre).norm() for code in quantizer.codebook) < 0.05


def test_encode_decode_shapes_and_code_range():
    model = VQModel(TINY).eval()
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    codes = model.encode(to_model_input(images))
    assert codes.shape == (3, 8, 8)
    assert codes.min() >= 0 and codes.max() < TINY.codebook_size
    decoded = model.decode(codes)
    assert decoded.shape == (3, 3, 32, 32)
    assert to_uint8(decoded).shape == (3, 32, 32, 3)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 8\)"):
        model.decode(torch.full((1, 8, 8), 8))


def test_numpy_helpers_round_trip_shapes():
    model = VQModel(TINY).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    codes = encode_images(model, images, batch_size=2)
    assert codes.shape == (5, 64)
    assert decode_codes(model, codes, batch_size=2).shape == (5, 32, 32, 3)


def test_hilbert_order_walks_neighbours_and_keeps_blocks_contiguous():
    for side in (2, 4, 8):
        order = hilbert_order(side)
        assert sorted(order) == list(range(side * side))  # a permutation of the grid
        cells = [divmod(i, side) for i in order]
        # consecutive tokens are grid neighbours (one step along a row or a column)
        steps = itertools.pairwise(cells)
        assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in steps)
        # every aligned quadrant is one contiguous run of the sequence
        half = side // 2
        quadrants = [(r // half, c // half) for r, c in cells]
        runs = [q for i, q in enumerate(quadrants) if i == 0 or q != quadrants[i - 1]]
        assert len(runs) == 4
    assert hilbert_order(2) == (0, 2, 3, 1)  # top-left, bottom-left, bottom-right, top-right
    with pytest.raises(ValueError, match="power-of-two grid side, got 6"):
        hilbert_order(6)


@pytest.mark.parametrize("order", ["raster", "hilbert"])
def test_token_order_round_trips_and_is_what_encode_images_writes(order):
    model = VQModel(dataclasses.replace(TINY, token_order=order)).eval()
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    grid = model.encode(to_model_input(torch.from_numpy(images)))
    sequences = encode_images(model, images, batch_size=3)
    expected = grid.reshape(4, 64)
    if order == "hilbert":
        expected = expected[:, list(hilbert_order(8))]
    assert np.array_equal(sequences, expected.numpy())
    assert torch.equal(model.to_grid(torch.from_numpy(sequences)), grid)
    # decoding reads the sequence back in the same order: the images of the grid
    assert np.array_equal(
        decode_codes(model, sequences, batch_size=3), to_uint8(model.decode(grid)).numpy()
    )
    with pytest.raises(ValueError, match="not a square grid"):
        decode_codes(model, sequences[:, :60])


def test_a_saved_tokenizer_keeps_its_token_order(tmp_path):
    model = VQModel(dataclasses.replace(TINY, token_order="hilbert"))
    save_vq(model, tmp_path / "vq")
    loaded, _ = load_vq(tmp_path / "vq")
    assert loaded.config.token_order == "hilbert"


def test_training_reduces_loss_and_is_deterministic():
    rng = np.random.default_rng(0)
    images = np.zeros((16, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(images):  # flat color blocks, easy to reconstruct
        image[8 * (i % 4) : 8 * (i % 4) + 8, :16] = rng.integers(0, 256, 3)
    logs = []
    train = VQTrainConfig(steps=40, batch_size=8, lr=0.003, warmup_steps=5, log_every=10)
    a = train_vq(images, TINY, train, seed=1, on_log=lambda s, m: logs.append(m["loss"]))
    b = train_vq(images, TINY, train, seed=1)
    assert logs[-1] < logs[0]
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_save_load_round_trip_and_tamper_detection(tmp_path):
    model = VQModel(TINY).eval()
    fingerprint = save_vq(model, tmp_path / "vq")
    loaded, loaded_fingerprint = load_vq(tmp_path / "vq")
    assert loaded_fingerprint == fingerprint
    for (name, x), (_, y) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    config_path = tmp_path / "vq" / "config.json"
    stored = json.loads(config_path.read_text())
    stored["config"]["commitment"] = 0.5
    config_path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="changed since they were saved"):
        load_vq(tmp_path / "vq")
    with pytest.raises(FileNotFoundError, match="not a VQ tokenizer folder"):
        load_vq(tmp_path / "missing")


def test_metrics_on_known_values():
    a = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # one channel of one pixel off by 255: MSE = 255^2 / 12
    assert psnr(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(10 * np.log10(12))
    stats = codebook_statistics(np.array([[0, 0, 1, 1]]), codebook_size=4)
    assert stats == {"codebook_usage_percent": 50.0, "codebook_perplexity": pytest.approx(2.0)}
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, :2] = 255  # 8 pixels
    recon = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    recon[0, :1] = 255  # 4 of them
    assert mask_iou(masks, recon) == 0.5
    # A second pair, both empty, counts as a perfect match: mean of 0.5 and 1.0.
    masks2 = np.concatenate([masks, np.zeros_like(masks)])
    recon2 = np.concatenate([recon, np.zeros_like(recon)])
    assert mask_iou(masks2, recon2) == 0.75
