"""Build a denoiser from a config, and load one from a checkpoint (weights only, no code)."""

from __future__ import annotations

import dataclasses

import torch

from .checkpoint import load_state_checked, read_weights, split_prefix
from .config import NetConfig, RunConfig
from .errors import EctuneError
from .networks import EDM2UNet, SongUNet
from .precond import EDMPrecond, Truncated

_NOT_NETWORK = ("size", "arch", "sigma_data", "eval_sigma_min", "truncate_t")
_EDM2_ONLY = ("channel_mult_noise", "dropout_res", "logvar_channels")
WEIGHTS = ("ema", "net")                    # a checkpoint's averaged and online weights


def build_network_of(net: NetConfig) -> torch.nn.Module:
    """The raw network F of a NetConfig: SongUNet ("ddpmpp") or EDM2UNet ("edm2")."""
    kwargs = {f.name: getattr(net, f.name) for f in dataclasses.fields(net) if f.name not in _NOT_NETWORK}
    if net.arch == "edm2":
        kwargs.pop("label_dropout")
        return EDM2UNet(**kwargs)
    return SongUNet(out_channels=net.in_channels, **{k: v for k, v in kwargs.items() if k not in _EDM2_ONLY})


def build_denoiser(net: NetConfig, seed: int = 0) -> torch.nn.Module:
    """EDMPrecond(network) for a NetConfig, initialised from `seed` (global RNG untouched); with
    net.truncate_t > 0, TCM's pair of two such denoisers (`precond.Truncated`: tuned, stage1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        D = EDMPrecond(build_network_of(net), sigma_data=net.sigma_data, label_dim=net.label_dim,
                       eval_sigma_min=net.eval_sigma_min)
    if net.truncate_t > 0:
        return Truncated(D, build_denoiser(dataclasses.replace(net, truncate_t=0.0), seed), net.truncate_t)
    return D


def student_net(teacher: NetConfig, recipe: NetConfig) -> NetConfig:
    """The teacher's architecture with the tuning recipe's dropout (and, between EDM2 networks, its
    dropout resolution) and without the logvar head, which consistency tuning does not use (the
    official ECT ImageNet-64 code drops it too), and untruncated (TCM's recipe truncates its own)."""
    dropout_res = recipe.dropout_res if teacher.arch == recipe.arch == "edm2" else teacher.dropout_res
    return dataclasses.replace(teacher, dropout=recipe.dropout, dropout_res=dropout_res, logvar_channels=0,
                               truncate_t=0.0)


def student_from(tensors: dict[str, torch.Tensor], net: NetConfig, source: str) -> EDMPrecond:
    """A denoiser of architecture `net` initialised from a checkpoint's EMA weights (ECT's start);
    a teacher's logvar head is left out when `net` has none."""
    D = build_denoiser(net)
    state = split_prefix(tensors, "ema")
    if not net.logvar_channels:
        state = {k: v for k, v in state.items() if not k.startswith("net.logvar_")}
    if net.truncate_t > 0 and not any(k.startswith("tuned.") for k in state):   # TCM from its stage-1 model
        state = {f"{part}.{k}": v for part in ("tuned", "stage1") for k, v in state.items()}
    load_state_checked(D, state, source)
    return D


def check_which(which: str) -> None:
    """A checkpoint's two sets of weights: "ema" (averaged) or "net" (online); anything else is refused."""
    if which not in WEIGHTS:
        raise EctuneError(f"--weights must be 'ema' or 'net', got {which!r}")


def load_denoiser(path, *, which: str = "ema", device="cpu") -> tuple[torch.nn.Module, RunConfig]:
    """The online ("net") or averaged ("ema") denoiser stored at `path`, in eval mode.

    `path` may also be a diffusers UNet2DModel DDPM folder: its D(x, σ) wrapper (:class:`VPEpsDenoiser`)
    comes back with a pretrain-kind config of its shape (data unknown: pass ``--ref-data`` to eval).
    """
    check_which(which)
    from .importers.diffusers_vp import diffusers_root
    if diffusers_root(path) is not None:
        return diffusers_denoiser(diffusers_root(path), device)
    cfg, tensors, _ = read_weights(path)
    D = build_denoiser(cfg.net)
    state = split_prefix(tensors, which) or split_prefix(tensors, "net")
    load_state_checked(D, state, f"{path} ({which} weights)")
    return D.to(device).eval(), cfg


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" → CUDA when present, else CPU; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EctuneError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise EctuneError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def diffusers_denoiser(root, device="cpu") -> tuple[torch.nn.Module, RunConfig]:
    """A diffusers DDPM folder as (D, config): the config only describes its shape and sampler."""
    from .importers.diffusers_vp import diffusers_shape, load_diffusers_teacher
    channels, size, classes = diffusers_shape(root)
    if classes:
        raise EctuneError(f"{root}: class-conditional diffusers UNets (num_class_embeds) are not supported")
    net = NetConfig(size="diffusers", img_resolution=size, in_channels=channels)
    cfg = RunConfig(preset="diffusers", data="", net=net)
    return load_diffusers_teacher(root, device), cfg
