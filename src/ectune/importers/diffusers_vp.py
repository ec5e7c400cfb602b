"""A diffusers ``UNet2DModel`` DDPM teacher (ε-prediction, variance preserving) as an EDM denoiser D(x, σ).

A DDPM with cumulative ᾱ_t (t = 0 … T−1) noises as x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. Dividing by √ᾱ_t
gives EDM's variance-exploding form x = x0 + σ·ε with

    σ_t = √((1 − ᾱ_t) / ᾱ_t),      x_t = x / √(1 + σ²)   (since √ᾱ_t = 1/√(1 + σ_t²)),

so the denoiser is D(x, σ) = x − σ·ε̂(x / √(1 + σ²), t(σ)), which equals DDPM's
x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t. For a σ between two discrete levels, the network is called
with a fractional timestep t(σ) found by linear interpolation of t in ln σ between the two
neighbouring levels (σ below σ_0 or above σ_{T−1} is clamped to t = 0 or T − 1; the true σ is
still used for the scaling and for D). At σ = 0, D(x, 0) = x without calling the network.

ECT tuning needs an ectune network as the student, so a diffusers teacher serves for sampling,
evaluation and as a distillation teacher through this wrapper; it is not converted to ectune's
network. Loading uses safetensors only (``use_safetensors=True``): no pickle is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EctuneError

DDPM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def vp_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                      beta_schedule: str = "linear", trained_betas=None) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t}(1 − β_s), float64 (T,), for DDPM's beta schedules.

    "linear": β evenly spaced from beta_start to beta_end (Ho et al. 2020); "scaled_linear": √β
    evenly spaced (Stable Diffusion); "squaredcos_cap_v2": β_t = min(1 − ā((t+1)/T)/ā(t/T), 0.999)
    with ā(u) = cos²((u + 0.008)/1.008 · π/2) (Nichol & Dhariwal 2021, eq. 17); or `trained_betas`.
    """
    T = int(num_train_timesteps)
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        u = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    else:
        raise EctuneError(f"unknown beta_schedule {beta_schedule!r}; use linear, scaled_linear or squaredcos_cap_v2")
    if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
        raise EctuneError("betas must be a 1-D schedule of at least 2 values in (0, 1)")
    return torch.cumprod(1 - betas, dim=0)


def alphas_cumprod_from(scheduler: Any = None) -> torch.Tensor:
    """ᾱ (T,) float64 from a diffusers scheduler, a scheduler config dict, or None (DDPM's defaults)."""
    if scheduler is not None and not isinstance(scheduler, Mapping):
        if hasattr(scheduler, "config"):
            _check_scheduler_config(scheduler.config)
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise EctuneError(f"{type(scheduler).__name__} has no alphas_cumprod; pass a DDPM-style scheduler")
        return torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clone()
    config = dict(scheduler or {})
    _check_scheduler_config(config)
    kwargs = {k: config.get(k, v) for k, v in DDPM_DEFAULTS.items()}
    return vp_alphas_cumprod(**kwargs, trained_betas=config.get("trained_betas"))


def _check_scheduler_config(config: Mapping) -> None:
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise EctuneError(f"prediction_type {config['prediction_type']!r} is not supported; only ε-prediction "
                          "(prediction_type='epsilon') DDPM teachers can be wrapped")
    if config.get("rescale_betas_zero_snr"):
        raise EctuneError("zero-terminal-SNR schedules (rescale_betas_zero_snr) have σ = ∞ at t = T−1; "
                          "not supported")


class VPEpsDenoiser(nn.Module):
    """EDM denoiser ``D(x, sigma, class_labels=None)`` around an ε-prediction DDPM network.

    `unet` is called as ``unet(x_t, t, class_labels=..., return_dict=False)[0]`` (diffusers'
    UNet2DModel convention) with x_t (B, C, H, W) and fractional timesteps t (B,).
    x (B, C, H, W), sigma (B,) or scalar; returns float32 (B, C, H, W).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if abar.ndim != 1 or len(abar) < 2 or not bool(((abar > 0) & (abar < 1)).all()):
            raise EctuneError("alphas_cumprod must be a 1-D tensor of values in (0, 1)")
        self.unet = unet
        self.register_buffer("log_sigmas", (((1 - abar) / abar).sqrt()).log(), persistent=False)  # (T,)
        if not bool((self.log_sigmas[1:] > self.log_sigmas[:-1]).all()):
            raise EctuneError("alphas_cumprod must decrease strictly with t")

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep for σ > 0: linear in ln σ between neighbouring levels, clamped."""
        log_s = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float64).log().clamp(log_s[0], log_s[-1])
        hi = torch.searchsorted(log_s, log_sigma).clamp(1, len(log_s) - 1)
        lo = hi - 1
        w = (log_sigma - log_s[lo]) / (log_s[hi] - log_s[lo])
        return lo.to(torch.float64) + w

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32)                                                # (B, C, H, W)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        positive = sigma > 0
        safe = torch.where(positive, sigma, torch.ones_like(sigma))           # ln 0 never reached
        t = self.sigma_to_t(safe).to(torch.float32)                            # (B,)
        s = safe.to(torch.float32).reshape(-1, 1, 1, 1)                        # (B, 1, 1, 1)
        x_t = x / (1 + s**2).sqrt()                                            # VP input
        eps = self.unet(x_t, t, class_labels=class_labels, return_dict=False)[0].to(torch.float32)
        return torch.where(positive.reshape(-1, 1, 1, 1), x - s * eps, x)


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise EctuneError("diffusers teachers need the diffusers package: pip install 'ectune[diffusers]'") from None
    return diffusers


def diffusers_root(path: str | Path) -> Path | None:
    """The model folder when `path` is a diffusers UNet2DModel folder, a pipeline folder holding
    ``unet/``, or the weights file inside one; else None."""
    p = Path(path)
    if p.is_file() and p.name.startswith("diffusion_pytorch_model"):
        p = p.parent
    if p.name == "unet" and (p.parent / "scheduler").is_dir():
        p = p.parent
    config = p / "unet" / "config.json" if (p / "unet" / "config.json").is_file() else p / "config.json"
    if not config.is_file():
        return None
    try:
        return p if json.loads(config.read_text()).get("_class_name") == "UNet2DModel" else None
    except (OSError, ValueError):
        return None


def diffusers_weights_file(root: Path) -> Path:
    """The safetensors weights of a diffusers folder (what provenance hashes)."""
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    found = sorted(unet_dir.glob("diffusion_pytorch_model*.safetensors"))
    if not found:
        raise EctuneError(f"{unet_dir} holds no diffusion_pytorch_model.safetensors; ectune reads safetensors only")
    return found[0]


def diffusers_shape(root: Path) -> tuple[int, int, int]:
    """(in_channels, sample_size, num_class_embeds or 0) from a diffusers folder's UNet config."""
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    cfg = json.loads((unet_dir / "config.json").read_text())
    size = cfg.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    if not isinstance(size, int) or not isinstance(cfg.get("in_channels", 3), int):
        raise EctuneError(f"{unet_dir}/config.json has no integer sample_size / in_channels")
    return int(cfg.get("in_channels", 3)), size, int(cfg.get("num_class_embeds") or 0)


def load_diffusers_teacher(path: str | Path, device: str | torch.device = "cpu") -> VPEpsDenoiser:
    """A DDPM pipeline folder (``unet/`` + ``scheduler/``) or a UNet2DModel folder, as D(x, σ) in eval mode.

    The schedule comes from ``scheduler/scheduler_config.json`` (or ``scheduler_config.json``) when
    present, else DDPM's defaults (linear β from 1e-4 to 0.02 over 1000 steps). Weights are read from
    safetensors only.
    """
    diffusers = _import_diffusers()
    root = Path(path)
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise EctuneError(f"{root} is not a diffusers model folder (no config.json or unet/config.json)")
    try:
        unet = diffusers.UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise EctuneError(f"cannot load a UNet2DModel from {unet_dir} ({e}); "
                          "it must hold safetensors weights") from None
    config = None
    for f in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if f.is_file():
            try:
                config = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise EctuneError(f"cannot parse {f}: {e}") from None
            break
    return VPEpsDenoiser(unet, alphas_cumprod_from(config)).to(device).eval()
