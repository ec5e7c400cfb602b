"""Raw networks F(x_in, c_noise, class_labels): they know nothing of σ (see ``ectune.precond``).

``NETWORK_PRESETS`` is the table of sizes; ``build_network`` turns a preset name (or a kwargs dict)
plus the data's shape into a :class:`SongUNet`.

    preset   widths (model_channels × mult)   blocks  attention   params at 28×28×1
    tiny     16 × (1, 1)                      1       (middle)    76,145
    small    16 × (1, 2, 4)                   1       7×7           744,225
    medium   32 × (1, 2, 2)                   1       7×7         1,259,393
    large    48 × (1, 2, 2)                   2       7×7         3,935,089
    ddpmpp   128 × (2, 2, 2)                  4       16×16       55,732,739 at 32×32×3

``EDM2UNet`` (``ectune.networks.edm2``) is EDM2's magnitude-preserving U-Net; ``EDM2_SIZES`` lists
the ImageNet-64 widths EDM2 released (xs 128, s 192, m 256, l 320, xl 384 channels, multipliers
1, 2, 3, 4, three blocks, attention at 16 and 8).

``ddpmpp`` is EDM's CIFAR-10 network (Karras et al. 2022, "55.7M"). EDM's released CIFAR-10
checkpoints also carry a 9×128 augmentation-label embedding (``augment_dim=9``, 55,733,891
parameters in all); it is unused at sampling time, so it is left out here unless asked for.
The middle of every U-Net (``in0``) has one attention layer whatever ``attn_resolutions`` says.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ectune.errors import EctuneError
from ectune.networks.edm2 import EDM2_SIZES, EDM2UNet
from ectune.networks.unet import SongUNet

__all__ = ["EDM2_SIZES", "EDM2UNet", "NETWORK_PRESETS", "SongUNet", "build_network", "count_parameters"]

NETWORK_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model_channels=16, channel_mult=(1, 1), num_blocks=1, attn_resolutions=(), dropout=0.0),
    # small: few channels at full resolution, for CPU speed (~100 img/s training on 2 cores at 28×28).
    "small": dict(model_channels=16, channel_mult=(1, 2, 4), num_blocks=1, attn_resolutions=(7,), dropout=0.1),
    "medium": dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(7,), dropout=0.1),
    "large": dict(model_channels=48, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(7,), dropout=0.1),
    # EDM's DDPM++ for CIFAR-10 (Karras et al. 2022, config F); dropout of its pretraining.
    "ddpmpp": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.13),
}


def build_network(
    preset_or_kwargs: str | Mapping[str, Any],
    *,
    img_resolution: int,
    in_channels: int,
    label_dim: int = 0,
    **overrides: Any,
) -> SongUNet:
    """A SongUNet from a preset name (or a dict of constructor kwargs) with `overrides` applied.

    Output channels equal input channels (the network predicts an image). Example:
    ``build_network("small", img_resolution=28, in_channels=1, dropout=0.2)``.
    """
    if isinstance(preset_or_kwargs, str):
        if preset_or_kwargs not in NETWORK_PRESETS:
            raise EctuneError(
                f"unknown network preset {preset_or_kwargs!r}; choose one of {sorted(NETWORK_PRESETS)}"
            )
        kwargs = dict(NETWORK_PRESETS[preset_or_kwargs])
    else:
        kwargs = dict(preset_or_kwargs)
    kwargs.update(overrides)
    kwargs.setdefault("out_channels", in_channels)
    try:
        return SongUNet(img_resolution=img_resolution, in_channels=in_channels, label_dim=label_dim, **kwargs)
    except TypeError as error:  # an unknown or duplicated keyword
        raise EctuneError(f"bad network settings {sorted(kwargs)}: {error}") from error


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of `module` (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in module.parameters())
