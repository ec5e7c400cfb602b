"""Samplers. Each is a pure function `sampler(D, noise, ...)` that calls only a denoiser D(x, σ).

`noise` is unit Gaussian (B, C, H, W); the samplers scale it by the first noise level themselves.
Step arithmetic runs in float64 (ECT.md §5); the returned samples are float32.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .schedules import karras_sigmas

Denoiser = Callable[..., torch.Tensor]


def _denoise(D: Denoiser, x: torch.Tensor, sigma: float, class_labels) -> torch.Tensor:
    s = torch.full((x.shape[0],), float(sigma), dtype=torch.float64, device=x.device)
    out = D(x, s) if class_labels is None else D(x, s, class_labels)   # any two-argument D(x, sigma) works
    return out.to(torch.float64)


@torch.no_grad()
def heun_sampler(D: Denoiser, noise: torch.Tensor, *, num_steps: int = 18, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, class_labels=None) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): Heun's method on the PF-ODE.

    Uses the Karras grid σ_0 > … > σ_{N−1}, σ_N = 0; NFE = 2N − 1 (N = 18 → 35).
    """
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    x = noise.to(torch.float64) * sigmas[0]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - _denoise(D, x, s_cur, class_labels)) / s_cur          # dx/dσ at σ_i
        x_next = x + (s_next - s_cur) * d_cur                               # Euler step
        if s_next > 0:                                                      # Heun correction
            d_next = (x_next - _denoise(D, x_next, s_next, class_labels)) / s_next
            x_next = x + (s_next - s_cur) * (d_cur + d_next) / 2
        x = x_next
    return x.to(torch.float32)


def heun_nfe(num_steps: int) -> int:
    """Network evaluations of `heun_sampler` with `num_steps` noise levels: 2N − 1."""
    return 2 * num_steps - 1


@torch.no_grad()
def dpmpp2m_sampler(D: Denoiser, noise: torch.Tensor, *, num_steps: int = 35, sigma_min: float = 0.002,
                    sigma_max: float = 80.0, rho: float = 7.0, class_labels=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep second order in data prediction.

    On EDM's PF-ODE x_σ = x0 + σε, so α = 1, λ = −log σ and h_i = λ_{i+1} − λ_i = log(σ_i / σ_{i+1}).
    With D_i = D(x_i, σ_i), each step σ_i → σ_{i+1} is

        x_{i+1} = (σ_{i+1} / σ_i)·x_i + (1 − e^{−h_i})·D̂_i,

    where D̂_0 = D_0 (first order, the DDIM step) and, later, with r_i = h_{i−1} / h_i,
    D̂_i = (1 + 1/(2 r_i))·D_i − 1/(2 r_i)·D_{i−1}. The last step, to σ = 0, has h = ∞ and
    e^{−h} = 0: it returns the data prediction D(x, σ_{N−1}) itself.

    Grid: the Karras grid with N = `num_steps` positive levels σ_0 = σmax > … > σ_{N−1} = σmin,
    then σ_N = 0; one D call per positive level, so NFE = N (any N ≥ 1; N = 1 is D(σmax·z, σmax)).
    """
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    x = noise.to(torch.float64) * sigmas[0]
    d_prev, h_prev = None, None
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = _denoise(D, x, s_cur, class_labels)                            # D_i
        if s_next == 0:                                                     # h = ∞: x = D_i
            x = d
            break
        h = math.log(s_cur / s_next)
        d_hat = d
        if d_prev is not None:                                              # second-order correction
            r = h_prev / h
            d_hat = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
        x = (s_next / s_cur) * x - math.expm1(-h) * d_hat
        d_prev, h_prev = d, h
    return x.to(torch.float32)


def dpmpp_nfe(num_steps: int) -> int:
    """Network evaluations of `dpmpp2m_sampler` with `num_steps` positive noise levels: N."""
    return num_steps


@torch.no_grad()
def consistency_sampler(D: Denoiser, noise: torch.Tensor, ts: Sequence[float] = (80.0,), *,
                        generator: torch.Generator | None = None, class_labels=None,
                        step_noise: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) with times t_0 > t_1 > …

    x = t_0·z; for each i: x ← D(x, t_i), then, if another time follows, x ← x + t_{i+1}·ε_new.
    1 step is D(80·z, 80). Fresh noise comes from `step_noise[i]` if given, else from `generator`.
    """
    ts = [float(t) for t in ts]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] <= 0:
        raise ValueError(f"consistency times must be positive and strictly decreasing, got {ts}")
    x = noise.to(torch.float64) * ts[0]
    for i, t in enumerate(ts):
        x = _denoise(D, x, t, class_labels)
        if i + 1 < len(ts):
            eps = step_noise[i] if step_noise is not None else torch.randn(
                noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            x = x + ts[i + 1] * eps.to(torch.float64)
    return x.to(torch.float32)


def default_consistency_times(steps: int, mid_ts: Sequence[float] = (), t_max: float = 80.0) -> list[float]:
    """Times for a k-step consistency sampler: [t_max, *mid_ts] when k − 1 mid times are given,
    else the first k levels of the Karras grid with k + 1 levels (a reasonable guess; search it)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(mid_ts) == steps - 1:
        return [t_max, *map(float, mid_ts)]
    return karras_sigmas(steps + 1, sigma_max=t_max, append_zero=False).tolist()[:steps]


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], count: int = 1, device=None) -> list[torch.Tensor]:
    """`count` unit-Gaussian tensors (len(seeds), *shape), each row drawn from its own seed.

    The first is the starting noise z, the rest the fresh noise of later consistency steps, so one
    seed gives the same image whatever the batch it is drawn in or the number of processes.
    """
    out = [torch.empty(len(seeds), *shape) for _ in range(count)]
    for row, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        for tensor in out:
            tensor[row] = torch.randn(*shape, generator=g)
    return [t.to(device) for t in out]


def sample_images(D: Denoiser, seeds: Sequence[int], shape: Sequence[int], *, sampler: str = "consistency",
                  ts: Sequence[float] = (80.0,), heun_steps: int = 18, dpm_nfe: int = 35, class_labels=None,
                  batch: int = 256, device=None, progress=None) -> torch.Tensor:
    """Samples for `seeds` with the named sampler, (N, C, H, W): "consistency" with times `ts`,
    "heun" with `heun_steps` noise levels, or "dpmpp2m" with `dpm_nfe` network evaluations.

    `progress` (e.g. a `progress.Progress` over len(seeds) samples) is advanced after every network
    call by the fraction of a sample that call stands for, so a bar moves within a batch too."""
    nfe = _check_sampling(seeds, sampler, ts, heun_steps, dpm_nfe, batch)
    if progress is not None:
        D = _counted(D, progress, nfe)
    chunks = []
    for i in range(0, len(seeds), batch):
        part = list(seeds[i:i + batch])
        labels = None if class_labels is None else class_labels[i:i + batch].to(device)
        if sampler == "heun":
            (z,) = seeded_noise(part, shape, 1, device)
            chunks.append(heun_sampler(D, z, num_steps=heun_steps, class_labels=labels).cpu())
        elif sampler == "dpmpp2m":
            (z,) = seeded_noise(part, shape, 1, device)
            chunks.append(dpmpp2m_sampler(D, z, num_steps=dpm_nfe, class_labels=labels).cpu())
        else:
            z, *eps = seeded_noise(part, shape, len(ts), device)
            chunks.append(consistency_sampler(D, z, ts, step_noise=eps, class_labels=labels).cpu())
    return torch.cat(chunks)


def _check_sampling(seeds, sampler: str, ts, heun_steps: int, dpm_nfe: int, batch: int) -> int:
    """Refuse settings no sampler can run (naming the CLI flag too); return the NFE per sample."""
    if sampler not in ("consistency", "heun", "dpmpp2m"):
        raise ValueError(f"unknown sampler {sampler!r}; use 'consistency', 'heun' or 'dpmpp2m' (--sampler)")
    for name, flag, value in (("batch", "--batch", batch), ("heun_steps", "--num-steps", heun_steps),
                              ("dpm_nfe", "--nfe", dpm_nfe)):
        if value < 1:
            raise ValueError(f"{name} ({flag}) must be >= 1, got {value}")
    if len(seeds) == 0:
        raise ValueError("no seeds to sample; ask for at least one sample (--n 1 or more)")
    return {"heun": heun_nfe(heun_steps), "dpmpp2m": dpmpp_nfe(dpm_nfe)}.get(sampler, len(ts))


def _counted(D: Denoiser, progress, nfe: int) -> Denoiser:
    """D that advances `progress` by len(x) / nfe samples per call."""
    def counted(x, sigma, *rest, **kw):
        out = D(x, sigma, *rest, **kw)
        progress.update(len(x) / nfe)
        return out
    return counted
