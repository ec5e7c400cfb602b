"""Building blocks of the DDPM++ U-Net (Song et al. 2021, as configured by EDM, Karras et al. 2022).

Everything here is plain PyTorch: ``nn.Linear``, ``nn.Conv2d`` and ``nn.GroupNorm`` with the
initialisation DDPM++ uses (Xavier-uniform weights, zero biases, a 1e-5 gain on the last layer of
every residual branch so a fresh network is close to the identity on its skip path), plus

* :class:`PositionalEmbedding` — the sinusoidal embedding of the noise label c_noise;
* :func:`resample` — 2× nearest upsampling or 2×2 average pooling (the [1, 1] filter of DDPM++);
* :class:`UNetBlock` — the residual block, optionally resampling and followed by self-attention.

Parameter names (``norm0``, ``conv0``, ``affine``, ``norm1``, ``conv1``, ``skip``, ``norm2``,
``qkv``, ``proj``) follow EDM's module hierarchy so released checkpoints can be mapped onto them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

INIT_ZERO_GAIN = 1e-5     # gain of the last layer of each residual branch ("init_zero" in EDM)
INIT_ATTN_GAIN = math.sqrt(0.2)  # gain of the attention's qkv projection


def _init(layer: nn.Linear | nn.Conv2d, gain: float = 1.0):
    """Xavier-uniform weight scaled by `gain`, zero bias; returns the layer."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def linear(in_features: int, out_features: int, bias: bool = True, gain: float = 1.0) -> nn.Linear:
    """A fully connected layer with DDPM++ initialisation."""
    return _init(nn.Linear(in_features, out_features, bias=bias), gain)


def conv(in_channels: int, out_channels: int, kernel: int, gain: float = 1.0) -> nn.Conv2d:
    """A 'same'-padded convolution (kernel 1 or 3) with DDPM++ initialisation."""
    return _init(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), gain)


def group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (EDM's rule).

    The group count is min(32, channels // 4), lowered further if needed so that it divides
    `channels`; for the usual widths (multiples of 128) this is exactly 32.
    """
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """'up': 2× nearest-neighbour; 'down': 2×2 average pool; 'keep': identity.

    These are the two uses of the [1, 1] resampling filter of DDPM++. (B, C, H, W) → (B, C, H', W').
    """
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (Vaswani et al. 2017; DDPM++ noise embedding).

    For n = `num_channels` the frequencies are f_i = (1/max_positions)^(i/(n/2 − 1)),
    i = 0 … n/2 − 1 (both ends included), and the output is [sin(x·f), cos(x·f)].
    (B,) → (B, n). It has no parameters.
    """

    def __init__(self, num_channels: int, max_positions: int = 10_000):
        super().__init__()
        if num_channels < 4 or num_channels % 2:
            raise ValueError(f"num_channels must be even and >= 4, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1)
        freqs = (1.0 / self.max_positions) ** exponent                        # (n/2,)
        angles = x.to(torch.float32)[:, None] * freqs[None, :]                 # (B, n/2)
        return torch.cat([angles.sin(), angles.cos()], dim=1)                  # (B, n)


class UNetBlock(nn.Module):
    """Residual block of DDPM++ with an optional self-attention layer after it.

    Residual branch: GroupNorm → SiLU → [resample] → conv3×3 → + affine(emb) → GroupNorm → SiLU →
    dropout → conv3×3. Skip path: identity, or [resample] → conv1×1 when the channel count changes
    or the block resamples (DDPM++'s ``resample_proj``). The sum is scaled by `skip_scale`.
    Attention (when `num_heads` > 0): x ← skip_scale · (x + proj(attend(qkv(GroupNorm(x))))).

    Call as ``block(x, emb)`` with x (B, in_channels, H, W) and emb (B, emb_channels);
    returns (B, out_channels, H', W') with H' = 2H for 'up', H/2 for 'down', H for 'keep'.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        resample_mode: str = "keep",
        num_heads: int = 0,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
    ):
        super().__init__()
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"resample_mode must be 'keep', 'up' or 'down', got {resample_mode!r}")
        if num_heads and out_channels % num_heads:
            raise ValueError(f"out_channels={out_channels} is not divisible by num_heads={num_heads}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample_mode = resample_mode
        self.num_heads = num_heads
        self.dropout = dropout
        self.skip_scale = skip_scale

        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = conv(in_channels, out_channels, 3)
        self.affine = linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = conv(out_channels, out_channels, 3, gain=INIT_ZERO_GAIN)
        needs_skip = in_channels != out_channels or resample_mode != "keep"
        self.skip = conv(in_channels, out_channels, 1) if needs_skip else None
        if num_heads:
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = conv(out_channels, 3 * out_channels, 1, gain=INIT_ATTN_GAIN)
            self.proj = conv(out_channels, out_channels, 1, gain=INIT_ZERO_GAIN)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x                                                               # (B, Cin, H, W)
        h = resample(F.silu(self.norm0(x)), self.resample_mode)                # (B, Cin, H', W')
        h = self.conv0(h)                                                      # (B, Cout, H', W')
        h = h + self.affine(emb)[:, :, None, None].to(h.dtype)                 # (B, Cout, H', W')
        h = F.silu(self.norm1(h))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))  # (B, Cout, H', W')
        skip = resample(orig, self.resample_mode)
        skip = self.skip(skip) if self.skip is not None else skip             # (B, Cout, H', W')
        x = (h + skip) * self.skip_scale
        if self.num_heads:
            x = (x + self.proj(self._attend(self.norm2(x)))) * self.skip_scale
        return x

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the H·W positions: (B, C, H, W) → (B, C, H, W).

        The qkv output channels are laid out as (head, channel, [q, k, v]), EDM's order.
        """
        B, C, H, W = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(B * heads, C // heads, 3, H * W)             # (B·h, C/h, 3, N)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))                   # (B·h, N, C/h) each
        a = F.scaled_dot_product_attention(q, k, v)                            # (B·h, N, C/h)
        return a.transpose(1, 2).reshape(B, C, H, W)                           # (B, C, H, W)
