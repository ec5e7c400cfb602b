"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", config G), written from the paper's equations.

Every layer keeps the expected magnitude (RMS) of its activations at 1 on unit-magnitude input:

* weights are normalised per output unit and scaled by 1/√fan_in (Eq. 47), and during training
  the stored weights themselves are renormalised before each use ("forced" weight normalisation,
  Eq. 66), so the optimizer only ever rotates them;
* SiLU is divided by 0.596, its output magnitude on N(0, 1) input (Eq. 81);
* sums and concatenations are weighted so that unit inputs give unit outputs (Eq. 88, 103);
* the noise embedding is cos(2π(f·c_noise + φ))·√2 with fixed random f, φ (Eq. 75);
* there are no biases and no group norms: pixel norm on the encoder's main path, learned scalar
  gains (``emb_gain``, ``out_gain``, initialised to 0) where a layer must be able to start silent.

Module and parameter names (``enc.64x64_block0.conv_res0.weight``, ``emb_fourier.freqs``, ...) follow
EDM2's released snapshots so they map onto this network one to one. The optional uncertainty head
(``logvar_fourier``, ``logvar_linear``: u(σ) of the paper's Eq. 21) lives here too, so that
``EDMPrecond`` can stay the same D(x, σ) for every network.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# ImageNet-64 sizes EDM2 released (its train_edm2.py presets) and their pretraining dropout.
EDM2_SIZES: dict[str, dict] = {
    "xs": dict(model_channels=128, dropout=0.0),
    "s": dict(model_channels=192, dropout=0.0),
    "m": dict(model_channels=256, dropout=0.1),
    "l": dict(model_channels=320, dropout=0.1),
    "xl": dict(model_channels=384, dropout=0.1),
}


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ‖x‖/√N) over `dim` (default: all but the first), N the elements normalised over."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 − t)·a + t·b rescaled to unit magnitude (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation weighted (1 − t) : t by channel share, at unit magnitude (Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], dim=dim)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """EDM2's [1, 1]-filter resampling: 2×2 mean ('down'), 2× nearest ('up') or identity ('keep')."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class MPFourier(nn.Module):
    """Fourier features of a scalar at unit magnitude (Eq. 75): (B,) → (B, num_channels)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()), Eq. 47 and 66.

    ``force_wn``: in training, with gradients on, the stored weight is renormalised in place before
    use (a pass under ``torch.no_grad``, such as ECT's stop-gradient target, leaves it untouched).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.force_wn = True

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        if self.training and self.force_wn and torch.is_grad_enabled():
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))
        w = normalize(self.weight.to(torch.float32))
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """Encoder ('enc') or decoder ('dec') block of EDM2's Figure 21, with optional self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)                                    # (B, Cin, H, W)
        if self.flavor == "enc":
            x = normalize(self.conv_skip(x) if self.conv_skip is not None else x, dim=1)   # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1                       # (B, Cout)
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)                                   # (B, Cout, H, W)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        return x.clip(-self.clip_act, self.clip_act) if self.clip_act is not None else x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine attention: q, k, v pixel-normalised per head."""
        y = self.attn_qkv(x)
        y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])   # (B, h, c, 3, HW)
        q, k, v = normalize(y, dim=2).unbind(3)
        w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        y = torch.einsum("nhqk,nhck->nhcq", w, v)
        return self.attn_proj(y.reshape(*x.shape))


class EDM2UNet(nn.Module):
    """F(x_in, c_noise, class_labels) of EDM2 (Figure 21), plus the optional logvar head.

    ``dropout_res`` > 0 applies dropout only at feature resolutions ≤ it (the official ECT ImageNet-64
    recipe: 16). ``logvar_channels`` > 0 adds the uncertainty head u(σ) (:meth:`logvar`).
    """

    def __init__(self, img_resolution: int, in_channels: int, label_dim: int = 0, model_channels: int = 192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise: int = 0, channel_mult_emb: int = 0,
                 num_blocks: int = 3, attn_resolutions=(16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, dropout: float = 0.0, dropout_res: int = 0,
                 logvar_channels: int = 0, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb else max(cblock)
        self.label_balance, self.concat_balance, self.label_dim = label_balance, concat_balance, label_dim
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, ())
        self.emb_label = MPConv(label_dim, cemb, ()) if label_dim else None

        block = _block_maker(cemb, dropout, dropout_res, block_kwargs)
        self.enc, cout = _encoder(block, in_channels, cblock, img_resolution, num_blocks, attn_resolutions)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec, cout = _decoder(block, cout, skips, cblock, img_resolution, num_blocks, attn_resolutions)
        self.out_conv = MPConv(cout, in_channels, (3, 3))
        if logvar_channels:
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, ())

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), noise_labels (B,), class_labels (B, label_dim) one-hot → (B, C, H, W)."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))                   # (B, E)
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
            labels = class_labels.to(emb.dtype) * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(labels), t=self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)                   # (B, C + 1, H, W)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

    def logvar(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """u(σ) of the paper's Eq. 21, the learned log-variance of the loss: (B,) → (B,)."""
        if not hasattr(self, "logvar_linear"):
            raise AttributeError("this EDM2UNet has no logvar head (logvar_channels=0)")
        return self.logvar_linear(self.logvar_fourier(noise_labels)).reshape(-1)


def _block_maker(emb_channels: int, dropout: float, dropout_res: int, block_kwargs: dict):
    """``block(cin, cout, res, **kw)``: a Block with the network's embedding width and settings; its
    dropout is `dropout` at resolutions <= `dropout_res` (every resolution when it is 0), else 0."""
    def block(cin: int, cout: int, res: int, **kw) -> Block:
        p = dropout if not dropout_res or res <= dropout_res else 0.0
        return Block(cin, cout, emb_channels, dropout=p, **block_kwargs, **kw)
    return block


def _encoder(block, in_channels, widths, img_resolution, num_blocks, attn_resolutions) -> tuple[nn.ModuleDict, int]:
    """One level per width: a 3×3 conv of the image and its constant channel (first level) or a
    downsampling block, then `num_blocks` blocks. Returns the modules and the last one's channels."""
    enc, cout = nn.ModuleDict(), in_channels + 1
    for level, channels in enumerate(widths):
        res = img_resolution >> level
        if level == 0:
            enc[f"{res}x{res}_conv"], cout = MPConv(cout, channels, (3, 3)), channels
        else:
            enc[f"{res}x{res}_down"] = block(cout, cout, res, flavor="enc", resample_mode="down")
        for i in range(num_blocks):
            enc[f"{res}x{res}_block{i}"] = block(cout, channels, res, flavor="enc", attention=res in attn_resolutions)
            cout = channels
    return enc, cout


def _decoder(block, cout, skips, widths, img_resolution, num_blocks, attn_resolutions) -> tuple[nn.ModuleDict, int]:
    """The encoder's mirror image: the middle (``in0`` with attention, ``in1``) or an upsampling block,
    then num_blocks + 1 blocks per level, each eating the latest skip. Returns the modules and channels."""
    dec, skips = nn.ModuleDict(), list(skips)
    for level, channels in reversed(list(enumerate(widths))):
        res = img_resolution >> level
        if level == len(widths) - 1:
            dec[f"{res}x{res}_in0"] = block(cout, cout, res, flavor="dec", attention=True)
            dec[f"{res}x{res}_in1"] = block(cout, cout, res, flavor="dec")
        else:
            dec[f"{res}x{res}_up"] = block(cout, cout, res, flavor="dec", resample_mode="up")
        for i in range(num_blocks + 1):
            dec[f"{res}x{res}_block{i}"] = block(cout + skips.pop(), channels, res, flavor="dec",
                                                 attention=res in attn_resolutions)
            cout = channels
    return dec, cout
