"""Map an unpickled EDM2 (or official-ECT ``imgnet``) snapshot onto ectune's EDM2UNet.

Both projects save ``Precond`` modules whose ``unet`` is EDM2's U-Net; EDM2's also carries the
uncertainty head (``logvar_fourier``, ``logvar_linear``), which the official ECT code leaves out. The
tensors keep their names (``unet.X`` becomes ``net.X``, ``logvar_*`` becomes ``net.logvar_*``); the
architecture comes from the recorded constructor arguments where present, else from the shapes, and
the settings shapes cannot show (balances, clipping, heads, dropout) are checked against the blocks'
pickled attributes. EDM2 writes its snapshots in float16; they are widened to float32.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..config import NetConfig
from ..errors import EctuneError
from .metadata import precond_parts

# Settings ectune's EDM2UNet fixes at EDM2's defaults; a file with other values is refused.
_FIXED = dict(label_balance=0.5, concat_balance=0.5, res_balance=0.3, attn_balance=0.3, clip_act=256)


def is_edm2(precond: Any) -> bool:
    """Whether a pickled preconditioner wraps EDM2's U-Net (``Precond.unet``)."""
    unet = precond.children.get("unet")
    return unet is not None and unet.class_name == "UNet"


def _shape_hints(t: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture read off EDM2's tensor names and shapes."""
    convs = [m for m in (re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", k) for k in t) if m]
    if len(convs) != 1 or "emb_noise.weight" not in t:
        raise EctuneError("not an EDM2 U-Net: expected one enc.RxR_conv.weight and emb_noise.weight")
    res, w = int(convs[0].group(1)), t[convs[0].group(0)]
    mc, emb = int(w.shape[0]), t["emb_noise.weight"]
    mults, r = [], res
    while f"enc.{r}x{r}_block0.conv_res1.weight" in t:
        mults.append(int(t[f"enc.{r}x{r}_block0.conv_res1.weight"].shape[0]) // mc)
        r //= 2
    return dict(
        img_resolution=res, in_channels=int(w.shape[1]) - 1, model_channels=mc, channel_mult=tuple(mults),
        channel_mult_emb=int(emb.shape[0]) // mc, channel_mult_noise=int(emb.shape[1]) // mc,
        label_dim=int(t["emb_label.weight"].shape[1]) if "emb_label.weight" in t else 0,
        num_blocks=sum(1 for k in t if re.fullmatch(rf"enc\.{res}x{res}_block\d+\.conv_res0\.weight", k)),
        attn_resolutions=tuple(sorted({int(m.group(1)) for m in (
            re.fullmatch(r"enc\.(\d+)x\1_block\d+\.attn_qkv\.weight", k) for k in t) if m}, reverse=True)),
        logvar_channels=int(t["logvar_fourier.freqs"].shape[0]) if "logvar_fourier.freqs" in t else 0)


def _dropout(unet: Any, kw: dict) -> tuple[float, int]:
    """(dropout, dropout_res): from the init kwargs, else from the blocks' pickled dropout values."""
    rates = {}
    for name, block in unet.children.get("enc").children.items() if unet.children.get("enc") else []:
        p = (block.state or {}).get("dropout")
        if isinstance(p, (int, float)):
            rates.setdefault(int(name.split("x")[0]), set()).add(float(p))
    seen = sorted({p for v in rates.values() for p in v})
    dropout = float(kw.get("dropout", max(seen, default=0.0)))
    if "dropout_res" in kw:
        return dropout, int(kw["dropout_res"] or 0)
    off = [res for res, v in rates.items() if v == {0.0}]
    return dropout, (max(res for res, v in rates.items() if dropout in v) if dropout and off else 0)


def _check_fixed(unet: Any, kw: dict, source: str) -> None:
    """Refuse balances, clipping or attention heads that ectune's EDM2UNet does not use."""
    bad = [f"{k}={kw[k]!r}" for k, v in _FIXED.items() if k in kw and kw[k] != v]
    if kw.get("channels_per_head", 64) != 64 or list(kw.get("resample_filter", [1, 1])) != [1, 1]:
        bad.append("channels_per_head/resample_filter")
    for path, node in [("", unet), *[(f"enc.{n}", b) for n, b in unet.children["enc"].children.items()],
                       *[(f"dec.{n}", b) for n, b in unet.children["dec"].children.items()]]:
        state = node.state or {}
        for k, v in _FIXED.items():
            if k in state and not (isinstance(state[k], (int, float)) and math.isclose(float(state[k]), v)):
                bad.append(f"{path}.{k}={state[k]!r}")
        out, heads = state.get("out_channels"), state.get("num_heads")
        if isinstance(out, int) and isinstance(heads, int) and heads and heads != out // 64:
            bad.append(f"{path}.num_heads={heads}")
    if bad:
        raise EctuneError(f"{source}: EDM2 settings {', '.join(bad[:6])} differ from EDM2's defaults, "
                          "which are all ectune's EDM2 network implements")


def edm2_net_config(precond: Any, tensors: dict[str, torch.Tensor], source: str) -> NetConfig:
    """NetConfig(arch="edm2") for a pickled EDM2/ECT ``Precond`` and its ``net.``-less tensors."""
    unet, kw, sigma_data = precond_parts(precond, "unet")
    _check_fixed(unet, kw, source)
    hints = _shape_hints(tensors)
    dropout, dropout_res = _dropout(unet, kw)
    try:
        fields = {k: tuple(int(x) for x in kw.get(k, v)) if isinstance(v, tuple) else int(kw.get(k) or v)
                  for k, v in hints.items() if k not in ("in_channels", "logvar_channels")}
        sigma_data = float(sigma_data)
    except (TypeError, ValueError) as e:
        raise EctuneError(f"{source}: cannot tell the EDM2 network's architecture ({e})") from None
    return NetConfig(size="imported", arch="edm2", in_channels=int(kw.get("img_channels", hints["in_channels"])),
                     logvar_channels=hints["logvar_channels"], dropout=dropout, dropout_res=dropout_res,
                     sigma_data=sigma_data, **fields)


def edm2_tensors(precond: Any) -> dict[str, torch.Tensor]:
    """The network's tensors under ectune's names (without the ``net.`` prefix)."""
    out = precond.children["unet"].named_tensors()
    for head in ("logvar_fourier", "logvar_linear"):
        if head in precond.children:
            out.update(precond.children[head].named_tensors(f"{head}."))
    return out
