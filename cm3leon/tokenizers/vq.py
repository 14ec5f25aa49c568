"""VQ image tokenizer: convolutional encoder -> vector quantizer -> decoder (DESIGN.md §5).

CM3Leon sees images only as discrete codes from a VQ tokenizer (the paper uses Gafni et al.'s
Make-A-Scene VQ-GAN, 256x256 -> 32x32 codes; here a small VQ-VAE, 32x32 -> 8x8 by default).
The quantizer follows van den Oord et al. 2017 with the VQ-VAE-2 EMA codebook update
(Razavi et al. 2019): codes are the nearest codebook vectors, gradients pass straight through,
the encoder is pulled towards its codes by a commitment loss, the codebook itself moves by an
exponential moving average of the vectors assigned to it, and codes whose usage falls below a
threshold are restarted on random encoder outputs of the current batch (dead-code restarts,
as in Jukebox / Zeghidour et al. 2021) so the codebook does not collapse.

Shapes: images are ``(B, 3, H, W)`` floats in [-1, 1]; latents ``(B, D, h, w)``; codes
``(B, h, w)`` int64 with ``h = H / 2**num_downsamples``.

The tokenizer also owns the order in which a code grid becomes the token sequence the
transformer reads and writes (``tokenize.vq.token_order``; :meth:`VQModel.to_sequence` and
:meth:`VQModel.to_grid`): ``raster`` (row by row, as CM3Leon, LlamaGen and Chameleon) or
``hilbert`` (a Hilbert curve, so every aligned 2x2, 4x4, ... block of codes is one contiguous
run and consecutive tokens are grid neighbours). Everything downstream sees only sequences.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from cm3leon.config import VQConfig


@lru_cache(maxsize=8)
def hilbert_order(side: int) -> tuple[int, ...]:
    """Raster index (``row * side + col``) of each step of the Hilbert curve over a
    ``side x side`` grid (``side`` a power of two), starting at the top-left cell and ending
    at the top-right one (the classic ``d2xy`` construction). Cached: every
    ``to_sequence`` / ``to_grid`` call asks for it."""
    if side < 1 or side & (side - 1):
        raise ValueError(f"a Hilbert order needs a power-of-two grid side, got {side}")
    order = []
    for d in range(side * side):
        x = y = 0
        t, s = d, 1
        while s < side:
            rx = 1 & (t // 2)
            ry = 1 & (t ^ rx)
            if ry == 0:
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x, y = x + s * rx, y + s * ry
            t //= 4
            s *= 2
        order.append(y * side + x)  # x: column, y: row
    return tuple(order)


def sequence_order(side: int, token_order: str) -> torch.Tensor:
    """``(side*side,)`` int64: the raster index of the code at each sequence position."""
    if token_order == "raster":
        return torch.arange(side * side)
    if token_order == "hilbert":
        try:
            return torch.tensor(hilbert_order(side))
        except ValueError as err:
            raise ValueError(f"tokenize.vq.token_order: hilbert: {err}") from None
    raise ValueError(f"tokenize.vq.token_order: unknown order {token_order!r}")


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """Stem, then one stride-2 conv per entry of ``channels`` (each halves H and W)."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        widths = config.channels
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        in_ch = widths[0]
        for out_ch in widths:
            layers.append(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1))
            layers.extend(ResBlock(out_ch) for _ in range(config.num_res_blocks))
            in_ch = out_ch
        layers += [nn.GroupNorm(8, in_ch), nn.SiLU(), nn.Conv2d(in_ch, config.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of :class:`Encoder` with transposed convolutions."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        widths = tuple(reversed(config.channels))
        layers: list[nn.Module] = [nn.Conv2d(config.code_dim, widths[0], 3, padding=1)]
        in_ch = widths[0]
        for out_ch in widths:
            layers.extend(ResBlock(in_ch) for _ in range(config.num_res_blocks))
            layers.append(nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1))
            in_ch = out_ch
        layers += [nn.GroupNorm(8, in_ch), nn.SiLU(), nn.Conv2d(in_ch, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer with EMA codebook updates and dead-code restarts."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        k, d = config.codebook_size, config.code_dim
        self.register_buffer("codebook", torch.randn(k, d) * 0.1)
        self.register_buffer("ema_count", torch.ones(k))
        self.register_buffer("ema_sum", self.codebook.clone())

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` ``(N, D)``."""
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 is constant per row.
        distances = self.codebook.pow(2).sum(1)[None, :] - 2 * flat @ self.codebook.t()
        return distances.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> latents ``(B, D, h, w)``."""
        return self.codebook[codes].permute(0, 3, 1, 2).contiguous()

    def forward(
        self, z: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``z`` ``(B, D, h, w)``: (straight-through latents, codes, commit loss)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        codes = self.nearest(flat.detach())
        quantized = self.codebook[codes]
        if self.training:
            self._ema_update(flat.detach(), codes, generator)
        commit = F.mse_loss(flat, quantized.detach())
        quantized = flat + (quantized - flat).detach()  # straight-through estimator
        latents = quantized.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return latents, codes.reshape(b, h, w), commit

    @torch.no_grad()
    def _ema_update(
        self, flat: torch.Tensor, codes: torch.Tensor, generator: torch.Generator | None
    ) -> None:
        decay = self.config.ema_decay
        onehot = F.one_hot(codes, self.config.codebook_size).type_as(flat)  # (N, K)
        self.ema_count.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(onehot.t() @ flat, alpha=1 - decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + self.config.codebook_size * 1e-5) * n
        self.codebook.copy_(self.ema_sum / count[:, None])
        dead = self.ema_count < self.config.restart_threshold
        if dead.any():
            picks = torch.randint(0, flat.shape[0], (int(dead.sum()),), generator=generator)
            self.codebook[dead] = flat[picks]
            self.ema_sum[dead] = flat[picks]
            self.ema_count[dead] = 1.0


class VQModel(nn.Module):
    """The whole tokenizer: ``encode`` images to codes, ``decode`` codes to images."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config)
        self.decoder = Decoder(config)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, codes, commitment loss)."""
        latents, codes, commit = self.quantizer(self.encoder(images), generator)
        return self.decoder(latents), codes, commit

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> codes ``(B, h, w)``."""
        z = self.encoder(images)
        b, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).reshape(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> images ``(B, 3, H, W)`` in [-1, 1]."""
        if codes.min() < 0 or codes.max() >= self.config.codebook_size:
            raise ValueError(
                f"codes must be in [0, {self.config.codebook_size}), got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        return self.decoder(self.quantizer.lookup(codes)).clamp(-1, 1)

    def to_sequence(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids ``(B, h, w)`` -> token sequences ``(B, h*w)`` in ``config.token_order``."""
        b, h, w = codes.shape
        if h != w:
            raise ValueError(f"code grids must be square, got {h}x{w}")
        return codes.reshape(b, h * w)[:, sequence_order(h, self.config.token_order)]

    def to_grid(self, sequences: torch.Tensor) -> torch.Tensor:
        """Token sequences ``(B, h*w)`` in ``config.token_order`` -> code grids ``(B, h, w)``."""
        b, n = sequences.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"codes per image ({n}) is not a square grid")
        grid = torch.empty_like(sequences)
        grid[:, sequence_order(side, self.config.token_order)] = sequences
        return grid.reshape(b, side, side)


def to_model_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8."""
    return images.add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)


def psnr(a_uint8: torch.Tensor, b_uint8: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) between two uint8 image batches, pooled MSE."""
    mse = (a_uint8.float() - b_uint8.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
