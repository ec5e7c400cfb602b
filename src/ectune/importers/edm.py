"""Import EDM / ECT network pickles without executing any code they carry.

EDM (Karras et al. 2022) and ECT, built on it, save snapshots as ``pickle.dump(dict(ema=net, ...))``
in which every network module is a "persistent class": its pickle calls
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta["module_src"]`` is the
*source code* of the module defining the class, which EDM's loader executes. ``pickle.load`` on such
a file runs whatever that source, or any other global the file names, says.

The file is read with :mod:`.pickles`' restricted unpickler, which resolves only stand-ins that build
data (``module_src`` is never looked at); anything else raises EctuneError naming the global.
The recovered tree (``snapshot["ema"]`` = EDMPrecond or ECMPrecond, whose ``model`` is a SongUNet)
is mapped onto ectune's EDMPrecond(SongUNet): EDM's ``model.*`` becomes ``net.*`` and every tensor
name, shape and the few shape-less settings (group counts, attention heads) are verified. EDM2's and
the official ECT ``imgnet`` branch's ``Precond`` (around EDM2's U-Net) go to :mod:`.edm2`. ECMPrecond
turns on official ECT's eval-mode σ_min shift (``net.eval_sigma_min``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import NetConfig
from ..errors import EctuneError
from ..models import build_denoiser
from ..networks import NETWORK_PRESETS
from .edm2 import edm2_net_config, edm2_tensors, is_edm2
from .metadata import precond_parts, snapshot_metadata
from .pickles import read_edm_pickle
from .records import PickledModule

PRECONDS = ("EDMPrecond", "ECMPrecond")     # both compute EDM's D(x, σ) around `self.model`
_ARCH = ("model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions")


# --- mapping onto ectune's network
def _precond_of(snapshot: Any, source: str) -> PickledModule:
    """snapshot["ema"] (a training snapshot dict) or the snapshot itself, checked to be a precond."""
    node = snapshot.get("ema") if isinstance(snapshot, dict) else snapshot
    if not isinstance(node, PickledModule):
        keys = sorted(map(str, snapshot)) if isinstance(snapshot, dict) else type(snapshot).__name__
        raise EctuneError(f"{source} holds no EDM network (found {keys}); expected a snapshot with an 'ema' network")
    if node.class_name == "Precond" and is_edm2(node):
        return node
    if node.class_name not in PRECONDS:
        raise EctuneError(f"{source}: the network is a {node.class_name}; only {'/'.join(PRECONDS)} "
                          "(EDM preconditioning) and EDM2's Precond can be imported")
    model = node.children.get("model")
    if model is None or model.class_name != "SongUNet":
        found = model.class_name if model is not None else "nothing"
        raise EctuneError(f"{source}: {node.class_name} wraps {found}; only SongUNet (DDPM++) networks can be "
                          "imported onto ectune's network")
    return node


def _check_variant(kw: dict, source: str) -> None:
    """Refuse SongUNet variants ectune's network does not implement (NCSN++ and friends)."""
    supported = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                     channel_mult_noise=1, resample_filter=[1, 1])
    bad = [f"{k}={kw[k]!r}" for k, v in supported.items()
           if k in kw and (list(kw[k]) if isinstance(kw[k], (list, tuple)) else kw[k]) != v]
    if "out_channels" in kw and "in_channels" in kw and kw["out_channels"] != kw["in_channels"]:
        bad.append(f"out_channels={kw['out_channels']!r} != in_channels")
    if bad:
        raise EctuneError(f"{source}: SongUNet settings {', '.join(bad)} are not supported; ectune implements "
                          "DDPM++ (positional embedding, standard encoder/decoder, [1,1] resampling)")


def _shape_hints(t: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture read off the tensors, for settings the pickle's init kwargs leave out."""
    convs = [m for m in (re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", k) for k in t) if m]
    if len(convs) != 1:
        return {}
    res, w = int(convs[0].group(1)), t[convs[0].group(0)]
    mc = int(w.shape[0])
    hints: dict[str, Any] = dict(img_resolution=res, in_channels=int(w.shape[1]), model_channels=mc)
    if "map_layer0.weight" in t:
        hints["channel_mult_emb"] = int(t["map_layer0.weight"].shape[0]) // mc
    if "map_label.weight" in t:
        hints["label_dim"] = int(t["map_label.weight"].shape[1])
    mults, r = [], res
    while f"enc.{r}x{r}_block0.conv0.weight" in t:
        mults.append(int(t[f"enc.{r}x{r}_block0.conv0.weight"].shape[0]) // mc)
        r //= 2
    hints["channel_mult"] = tuple(mults)
    hints["num_blocks"] = sum(1 for k in t if re.fullmatch(rf"enc\.{res}x{res}_block\d+\.conv0\.weight", k))
    hints["attn_resolutions"] = tuple(sorted({int(m.group(1)) for m in (
        re.fullmatch(r"enc\.(\d+)x\1_block\d+\.qkv\.weight", k) for k in t) if m}, reverse=True))
    return hints


def net_config_from(precond: PickledModule, tensors: dict[str, torch.Tensor], source: str) -> NetConfig:
    """NetConfig from the pickled init kwargs where present, else read off the tensor shapes."""
    unet, kw, sigma_data = precond_parts(precond, "model")
    _check_variant(kw, source)
    hints = _shape_hints(tensors)

    def pick(name: str, *aliases: str, default: Any = None) -> Any:
        return next((kw[n] for n in (name, *aliases) if n in kw), hints.get(name, default))

    try:
        fields = dict(img_resolution=int(pick("img_resolution")), in_channels=int(pick("in_channels", "img_channels")),
                      label_dim=int(pick("label_dim", default=0)), model_channels=int(pick("model_channels")),
                      channel_mult=tuple(int(m) for m in pick("channel_mult")),
                      channel_mult_emb=int(pick("channel_mult_emb")), num_blocks=int(pick("num_blocks")),
                      attn_resolutions=tuple(int(r) for r in pick("attn_resolutions")),
                      dropout=float(pick("dropout", default=0.1)),
                      label_dropout=float(pick("label_dropout", default=0.0)),
                      sigma_data=float(sigma_data))
    except (TypeError, ValueError) as e:
        raise EctuneError(f"{source}: cannot tell the network's architecture from its init kwargs "
                          f"or tensors ({e})") from None
    return NetConfig(size=_preset_name(fields), **fields)


def _preset_name(fields: dict) -> str:
    """The NETWORK_PRESETS entry with this architecture, or "imported"."""
    for name, p in NETWORK_PRESETS.items():
        want = {"channel_mult_emb": 4, **p}
        if all((tuple(want[k]) if isinstance(want[k], (list, tuple)) else want[k]) == fields[k] for k in _ARCH):
            return name
    return "imported"


def _drop_unused(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove EDM's [1,1] resample-filter buffers (ectune resamples without them) and the
    augmentation embedding (only used when augmentation labels are passed, never at sampling)."""
    out, notes = {}, []
    quarter = torch.full((1, 1, 2, 2), 0.25)
    for name, value in tensors.items():
        if name.endswith("resample_filter"):
            if value.shape != quarter.shape or not torch.equal(value.to(torch.float32), quarter):
                raise EctuneError(f"{source}: {name} is not DDPM++'s [1,1] filter; this network cannot be imported")
            continue
        if name == "map_augment.weight":
            notes.append(f"dropped the unused augmentation embedding map_augment.weight {tuple(value.shape)}")
            continue
        out[name] = value
    return out, notes


def _verify(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Error listing every missing, unexpected and mis-shaped tensor (up to 6 of each)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = sorted(f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k].shape)})"
                    for k in set(expected) & set(found) if expected[k].shape != found[k].shape)
    parts = [f"{len(v)} {what}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}"
             for what, v in (("missing", missing), ("unexpected", extra), ("mis-shaped", shapes)) if v]
    if parts:
        raise EctuneError(f"{source} does not map onto ectune's DDPM++ network: {'; '.join(parts)}")


def _verify_settings(unet: PickledModule, net: torch.nn.Module, source: str) -> None:
    """Check what shapes cannot show: group counts, norm eps, attention heads, skip scale, embedding."""
    bad = []
    for path, module in net.named_modules():
        node = unet.find(path)
        state = node.state if node is not None and node.state else {}
        for attr in ("num_groups", "eps", "num_heads", "skip_scale", "max_positions", "num_channels"):
            if attr in state and hasattr(module, attr):
                mine, theirs = getattr(module, attr), state[attr]
                if not (isinstance(theirs, (int, float)) and math.isclose(float(mine), float(theirs), rel_tol=1e-6)):
                    bad.append(f"{path or 'model'}.{attr}={theirs!r} (ectune: {mine!r})")
        if state.get("adaptive_scale") or state.get("endpoint") is False:
            bad.append(f"{path}: adaptive_scale / endpoint=False variant")
    if bad:
        raise EctuneError(f"{source}: settings differ from ectune's DDPM++: {', '.join(bad[:6])}")


def edm_to_ectune(snapshot: Any, source: str) -> tuple[NetConfig, dict[str, torch.Tensor], list[str]]:
    """(NetConfig, EDMPrecond state_dict ``net.*`` in float32, notes) for an unpickled EDM snapshot."""
    precond = _precond_of(snapshot, source)
    if is_edm2(precond):
        tensors, notes = edm2_tensors(precond), []
        cfg, unet = edm2_net_config(precond, tensors, source), None
    else:
        unet = precond.children["model"]
        tensors, notes = _drop_unused(unet.named_tensors(), source)
        cfg = net_config_from(precond, tensors, source)
    if precond.class_name == "ECMPrecond":      # official ECT evaluates with c_skip/c_out shifted by sigma_min
        cfg = replace(cfg, eval_sigma_min=_sigma_min(precond, source))
        notes.append(f"official ECT's eval-mode sigma_min={cfg.eval_sigma_min} shift of c_skip/c_out is on "
                     "(net.eval_sigma_min)")
    try:
        D = build_denoiser(cfg)
    except (EctuneError, ValueError) as e:
        raise EctuneError(f"{source}: its settings do not build a network ({e})") from None
    _verify(D.net.state_dict(), tensors, source)
    if unet is not None:
        _verify_settings(unet, D.net, source)
    state = {f"net.{k}": v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    return cfg, state, notes


def snapshot_family(snapshot: Any) -> str:
    """Which code wrote a snapshot: "ect" (official ECT: ECMPrecond, an ECMLoss, or an EDM2 Precond
    without EDM2's logvar head), "edm2" or "edm"."""
    precond = snapshot.get("ema") if isinstance(snapshot, dict) else snapshot
    loss = snapshot.get("loss_fn") if isinstance(snapshot, dict) else None
    loss_name = getattr(loss, "class_name", "")
    if precond.class_name == "ECMPrecond" or loss_name == "ECMLoss":
        return "ect"
    if is_edm2(precond):
        return "edm2" if "logvar_linear" in precond.children or loss_name == "EDM2Loss" else "ect"
    return "edm"


def _sigma_min(precond: PickledModule, source: str) -> float:
    """ECMPrecond's sigma_min (its attribute, else its init kwarg, else ECT's default 0.003)."""
    value = precond.state.get("sigma_min", precond.init_kwargs.get("sigma_min", 0.003))
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise EctuneError(f"{source}: ECMPrecond.sigma_min is {value!r}, expected a number in [0, 1)")
    return float(value)


def import_edm_pickle(src: str | Path, out: str | Path, *, preset_name: str | None = None,
                      data: str | None = None) -> dict:
    """Convert an EDM/ECT snapshot pickle into an ectune weights file (``ema.*`` + config metadata).

    The file works with ``ectune sample --ckpt OUT`` and ``ectune tune --teacher OUT``. The config
    is the `preset_name` pretrain preset (default "cifar10", the paper's tuning recipe) with the
    imported network; `data` is the dataset spec recorded for tuning (default "cifar10" for
    32x32 RGB networks, else none: pass ``--data`` to tune). Returns a summary dict.
    """
    from .files import write_model_file
    from ..presets import preset

    src = Path(src)
    snapshot = read_edm_pickle(src)
    net, state, notes = edm_to_ectune(snapshot, str(src))
    family = snapshot_family(snapshot)
    about = snapshot_metadata(snapshot)
    encoder = about.get("encoder", {}).get("class_name", "") if isinstance(about.get("encoder"), dict) else ""
    if encoder and encoder != "StandardRGBEncoder":
        raise EctuneError(f"{src}: the network works in the latent space of a {encoder} (EDM2's latent models); "
                          "ectune trains and samples in pixel space, so only pixel-space snapshots can be imported")
    shape = (net.in_channels, net.img_resolution)
    default = "imagenet64" if net.arch == "edm2" else "cifar10"
    kind = "tune" if family == "ect" else "pretrain"      # an official ECT model is a consistency model
    cfg = replace(preset(preset_name or default, kind), net=net, teacher="",
                  data=data if data is not None else ("cifar10" if shape == (3, 32) else ""))
    meta = {"step": "0", "weights": "ema", "source": f"edm-pkl {src.name}", "note": "; ".join(notes),
            "family": family, "snapshot": json.dumps(about)}
    path = write_model_file(out, cfg, {f"ema.{k}": v for k, v in state.items()}, meta)
    params = sum(v.numel() for v in state.values())
    return {"out": str(path), "params": params, "net": net, "notes": notes, "preset": cfg.preset, "data": cfg.data,
            "family": family, "kind": kind}
