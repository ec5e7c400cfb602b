"""The DDPM++ U-Net ("SongUNet") of Song et al. 2021 in the configuration EDM uses for CIFAR-10.

This is the raw network F of EDM's preconditioning, D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise):
it sees only the scaled input and the noise label c_noise = ln(σ)/4, never σ itself.

Layout for ``channel_mult=(2, 2, 2)`` at 32×32 (the paper's 55.7M-parameter CIFAR-10 model)::

    map_noise → map_layer0 → SiLU → map_layer1 → SiLU                     emb (B, 512)
    enc: 32x32_conv, 32x32_block0..3, 16x16_down, 16x16_block0..3 (+attn), 8x8_down, 8x8_block0..3
    dec: 8x8_in0 (+attn), 8x8_in1, 8x8_block0..4, 16x16_up, 16x16_block0..4 (block4 +attn),
         32x32_up, 32x32_block0..4, 32x32_aux_norm → SiLU → 32x32_aux_conv

Every encoder output is kept as a skip; each decoder ``block{i}`` concatenates the most recent one.
Module and parameter names follow EDM's so its released weights can be mapped onto this network.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ectune.errors import EctuneError
from ectune.networks.layers import INIT_ZERO_GAIN, PositionalEmbedding, UNetBlock, conv, group_norm, linear


def level_resolutions(img_resolution: int, num_levels: int) -> list[int]:
    """Resolutions of the U-Net levels, e.g. 28 → [28, 14, 7]; raises if a level can't be halved."""
    resolutions = [int(img_resolution)]
    for _ in range(num_levels - 1):
        if resolutions[-1] % 2:
            raise EctuneError(
                f"img_resolution={img_resolution} cannot be halved {num_levels - 1} times evenly "
                f"(levels so far: {resolutions}); use fewer entries in channel_mult "
                f"or a resolution divisible by {2 ** (num_levels - 1)}"
            )
        resolutions.append(resolutions[-1] // 2)
    return resolutions


class SongUNet(nn.Module):
    """DDPM++ U-Net: ``F(x_in, noise_labels, class_labels=None) -> (B, out_channels, H, W)``.

    Args:
        img_resolution: height = width of the input; must be halvable len(channel_mult) − 1 times.
        in_channels, out_channels: image channels at input and output.
        label_dim: number of classes (0 = unconditional).
        model_channels: base width; level i has model_channels · channel_mult[i] channels.
        channel_mult: per-level width multipliers (one level per entry).
        channel_mult_emb: embedding width = model_channels · channel_mult_emb.
        num_blocks: residual blocks per encoder level (the decoder has num_blocks + 1).
        attn_resolutions: resolutions with single-head self-attention.
        dropout: dropout probability inside the residual blocks.
        label_dropout: probability of dropping a sample's label at train time (classifier-free
            guidance); a dropped label is an all-zero label vector.
        augment_dim: size of EDM's augmentation-label input (0 = none, the default). EDM's
            CIFAR-10 models were trained with 9; it is only used when ``augment_labels`` is passed.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        augment_dim: int = 0,
    ):
        super().__init__()
        if not channel_mult or num_blocks < 1 or model_channels < 4 or model_channels % 2:
            raise EctuneError("SongUNet needs at least one level, one block per level and an even model_channels >= 4 "
                              f"(its noise embedding's width); got channel_mult={tuple(channel_mult)}, "
                              f"num_blocks={num_blocks}, model_channels={model_channels}")
        if not 0.0 <= dropout < 1.0 or not 0.0 <= label_dropout < 1.0:
            raise EctuneError(f"dropout and label_dropout must lie in [0, 1), got {dropout} and {label_dropout}")
        resolutions = level_resolutions(img_resolution, len(channel_mult))
        self.img_resolution = int(img_resolution)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.label_dim = int(label_dim)
        self.label_dropout = float(label_dropout)
        emb_channels = model_channels * channel_mult_emb
        block = functools.partial(UNetBlock, emb_channels=emb_channels, dropout=dropout, skip_scale=math.sqrt(0.5),
                                  eps=1e-6)
        levels = [(res, model_channels * mult) for res, mult in zip(resolutions, channel_mult)]
        attn = set(int(r) for r in attn_resolutions)

        # Mapping network: c_noise (+ labels) → embedding.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_label = linear(label_dim, model_channels) if label_dim else None
        self.map_augment = linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = linear(model_channels, emb_channels)
        self.map_layer1 = linear(emb_channels, emb_channels)
        self.enc, skips = _encoder(in_channels, model_channels, levels, num_blocks, attn, block)
        self.dec = _decoder(out_channels, levels, num_blocks, attn, block, skips)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, in_channels, H, W), noise_labels (B,), class_labels (B, label_dim) or None.

        Returns (B, out_channels, H, W). For a class-conditional network, ``class_labels=None``
        means "no label" (the all-zero vector that label dropout trains for).
        """
        self._check_inputs(x, noise_labels, class_labels)
        emb = self._embedding(x, noise_labels, class_labels, augment_labels)   # (B, E)

        blocks = iter(self.enc.values())
        x = next(blocks)(x)                                                    # (B, C0, H, W)
        skips = [x]
        for block in blocks:
            x = block(x, emb)                                                  # (B, Ci, Hi, Wi)
            skips.append(x)

        for name, block in self.dec.items():
            if name.endswith("_aux_norm"):
                x = F.silu(block(x))                                           # (B, C0, H, W)
            elif name.endswith("_aux_conv"):
                x = block(x)                                                   # (B, out, H, W)
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)                     # (B, Ci + Cskip, Hi, Wi)
                x = block(x, emb)                                              # (B, Ci, Hi, Wi)
        return x

    def _embedding(self, x, noise_labels, class_labels, augment_labels) -> torch.Tensor:
        """Mapping network: sinusoidal c_noise (+ label and augment embeddings) → 2-layer MLP."""
        emb = self.map_noise(noise_labels).to(x.dtype)                         # (B, Cn)
        if self.map_label is not None:
            labels = class_labels if class_labels is not None else x.new_zeros(x.shape[0], self.label_dim)
            labels = labels.to(x.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand(x.shape[0], 1, device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)                        # (B, label_dim)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))     # (B, Cn)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(x.dtype))           # (B, Cn)
        emb = F.silu(self.map_layer0(emb))                                     # (B, E)
        return F.silu(self.map_layer1(emb))                                    # (B, E)

    def _check_inputs(self, x, noise_labels, class_labels):
        """Raise EctuneError early when shapes do not fit this network."""
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise EctuneError(f"SongUNet expects x of shape (B, {shape}), got {tuple(x.shape)}")
        if noise_labels.shape != (x.shape[0],):
            raise EctuneError(f"noise_labels must have shape ({x.shape[0]},), got {tuple(noise_labels.shape)}")
        if class_labels is not None and self.label_dim == 0:
            raise EctuneError("this network is unconditional (label_dim=0) but class_labels were given")
        if class_labels is not None and class_labels.shape != (x.shape[0], self.label_dim):
            raise EctuneError(
                f"class_labels must have shape ({x.shape[0]}, {self.label_dim}) (one-hot), "
                f"got {tuple(class_labels.shape)}"
            )


def _encoder(in_channels, model_channels, levels, num_blocks, attn, block) -> tuple[nn.ModuleDict, list[int]]:
    """One level per (resolution, width) in `levels`: a 3×3 conv (first level) or a downsampling block,
    then `num_blocks` blocks. Returns the modules and the channels of every output, all skips."""
    enc, skips = nn.ModuleDict(), []
    cout = model_channels
    for level, (res, width) in enumerate(levels):
        tag = f"{res}x{res}"
        if level == 0:
            enc[f"{tag}_conv"] = conv(in_channels, cout, 3)
        else:
            enc[f"{tag}_down"] = block(cout, cout, resample_mode="down")
        skips.append(cout)
        for idx in range(num_blocks):
            cin, cout = cout, width
            enc[f"{tag}_block{idx}"] = block(cin, cout, num_heads=1 if res in attn else 0)
            skips.append(cout)
    return enc, skips


def _decoder(out_channels, levels, num_blocks, attn, block, skips) -> nn.ModuleDict:
    """The encoder's mirror image: the middle (``in0`` with attention, ``in1``) or an upsampling block,
    then num_blocks + 1 blocks per level, each eating the latest skip; then norm and 3×3 conv out."""
    dec, skips = nn.ModuleDict(), list(skips)
    cout = skips[-1]
    for level in reversed(range(len(levels))):
        res, width = levels[level]
        tag = f"{res}x{res}"
        if level == len(levels) - 1:
            dec[f"{tag}_in0"] = block(cout, cout, num_heads=1)
            dec[f"{tag}_in1"] = block(cout, cout)
        else:
            dec[f"{tag}_up"] = block(cout, cout, resample_mode="up")
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), width
            dec[f"{tag}_block{idx}"] = block(cin, cout, num_heads=1 if idx == num_blocks and res in attn else 0)
    tag = f"{levels[0][0]}x{levels[0][0]}"
    dec[f"{tag}_aux_norm"] = group_norm(cout, eps=1e-6)
    dec[f"{tag}_aux_conv"] = conv(cout, out_channels, 3, gain=INIT_ZERO_GAIN)
    return dec
