"""Build a denoiser from a config, and load one from a checkpoint (weights only, no code)."""

from __future__ import annotations

import dataclasses

import torch

from .checkpoint import load_state_checked, read_weights, split_prefix
from .config import NetConfig, RunConfig
from .errors import EctuneError
from .networks import SongUNet
from .precond import EDMPrecond


def build_denoiser(net: NetConfig, seed: int = 0) -> EDMPrecond:
    """EDMPrecond(SongUNet(...)) for a NetConfig, initialised from `seed` (global RNG untouched)."""
    kwargs = {f.name: getattr(net, f.name) for f in dataclasses.fields(net) if f.name not in ("size", "sigma_data")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EDMPrecond(SongUNet(out_channels=net.in_channels, **kwargs), sigma_data=net.sigma_data,
                          label_dim=net.label_dim)


def student_from(tensors: dict[str, torch.Tensor], net: NetConfig, source: str) -> EDMPrecond:
    """A denoiser of architecture `net` initialised from a checkpoint's EMA weights (ECT's start)."""
    D = build_denoiser(net)
    load_state_checked(D, split_prefix(tensors, "ema"), source)
    return D


def load_denoiser(path, *, which: str = "ema", device="cpu") -> tuple[EDMPrecond, RunConfig]:
    """The online ("net") or averaged ("ema") denoiser stored at `path`, in eval mode."""
    if which not in ("ema", "net"):
        raise EctuneError(f"--weights must be 'ema' or 'net', got {which!r}")
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
