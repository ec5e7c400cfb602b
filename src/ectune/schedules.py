"""Noise-level schedules: lognormal sampling, the Karras grid, ECT's mapping function t → r.

Every function is pure; randomness enters through a generator argument.
"""

from __future__ import annotations

import math

import torch


def lognormal_sigma(n: int, P_mean: float, P_std: float, *, generator=None, device=None) -> torch.Tensor:
    """ln σ ~ N(P_mean, P_std²) (EDM §5; ECT §4.1 for t). Returns (n,) float32."""
    z = torch.randn(n, generator=generator, device=device)
    return (P_mean + P_std * z).exp()


def truncated_t_sigma(n: int, P_mean: float, P_std: float, df: float, sigma_lo: float, sigma_hi: float, *,
                      generator: torch.Generator, grid: int = 16385) -> torch.Tensor:
    """ln σ ~ Student-t with `df` degrees of freedom, located at P_mean and scaled by P_std, truncated to
    [ln σ_lo, ln σ_hi] (TCM's heavy-tailed t for its second stage, Lee et al. 2025). Returns (n,) float32.

    Inverse-CDF sampling from u ~ U[0, 1) of `generator`: the truncated density
    (1 + z²/df)^(−(df+1)/2), z = (ln σ − P_mean)/P_std, is integrated in float64 by the trapezoid rule on
    `grid` points of [ln σ_lo, ln σ_hi] and its CDF inverted by linear interpolation.
    """
    y = torch.linspace(math.log(sigma_lo), math.log(sigma_hi), grid, dtype=torch.float64, device=generator.device)
    density = (1 + ((y - P_mean) / P_std) ** 2 / df) ** (-(df + 1) / 2)
    cdf = torch.cat([y.new_zeros(1), ((density[1:] + density[:-1]) / 2 * (y[1] - y[0])).cumsum(0)])
    cdf = cdf / cdf[-1]
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
    i = torch.searchsorted(cdf, u, right=True).clamp(1, grid - 1)
    frac = (u - cdf[i - 1]) / (cdf[i] - cdf[i - 1]).clamp_min(1e-300)
    return (y[i - 1] + frac * (y[i] - y[i - 1])).exp().to(torch.float32)


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  *, append_zero: bool = True, dtype=torch.float64) -> torch.Tensor:
    """EDM eq. 5: σ_i = (σmax^{1/ρ} + i/(N−1)·(σmin^{1/ρ} − σmax^{1/ρ}))^ρ, i < N, then σ_N = 0.

    Returns (N+1,) with a trailing zero, or (N,) without it. N = 1 gives just [σmax(, 0)].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=dtype)
    frac = i / max(num_steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if append_zero else sigmas


def ect_stage(step: int, stage_iters: int) -> int:
    """Stage index s = ⌊step / stage_iters⌋ (ECT §4.2; the pretrained DM is the skipped stage a = 0)."""
    if stage_iters <= 0:
        raise ValueError(f"stage_iters must be positive, got {stage_iters}")
    return step // stage_iters


def ect_r(t: torch.Tensor, stage: int, *, q: float = 2.0, k: float = 8.0, b: float = 1.0,
          dt_floor: float = 0.0) -> torch.Tensor:
    """ECT's mapping function (§4.2): n(t) = 1 + k·sigmoid(−b·t); r = max(0, t·(1 − n(t)/q^(s+1))).

    Δt/t = n(t)/q^(s+1) shrinks with the stage s, so r → t as training proceeds; 0 ≤ r < t.
    `dt_floor` > 0 keeps 1/q^(s+1) ≥ dt_floor (TCM's code: its ratio limit 0.999 is a floor of 0.001).
    """
    n = 1 + k * torch.sigmoid(-b * t)
    scale = q ** (stage + 1)
    if dt_floor > 0:
        scale = min(scale, 1 / dt_floor)
    r = t * (1 - n / scale)
    return r.clamp(min=0)


def ict_num_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum (Song & Dhariwal 2023, eq. 11): levels double from s0 to s1."""
    k_prime = math.floor(total_steps / (math.log2(s1 / s0) + 1))
    return min(s0 * 2 ** math.floor(step / max(k_prime, 1)), s1) + 1


def ict_t_r(n: int, num_levels: int, *, P_mean: float = -1.1, P_std: float = 2.0, sigma_min: float = 0.002,
            sigma_max: float = 80.0, rho: float = 7.0, generator=None, device=None):
    """iCT's discrete noise pairs (Song & Dhariwal 2023, §3.5): Karras levels σ_1 < … < σ_N and
    i ~ p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std)) − erf((ln σ_i − P_mean)/(√2·P_std)).

    Returns (t, r) = (σ_{i+1}, σ_i), each (n,) float32; r ≥ σ_min > 0.
    """
    if num_levels < 2:
        raise ValueError(f"iCT needs at least 2 noise levels, got {num_levels}")
    levels = karras_sigmas(num_levels, sigma_min, sigma_max, rho, append_zero=False).flip(0)   # ascending
    cdf = torch.erf((levels.log() - P_mean) / (math.sqrt(2) * P_std))
    i = torch.multinomial((cdf[1:] - cdf[:-1]).float().to(device), n, replacement=True, generator=generator)
    levels = levels.float().to(device)
    return levels[i + 1], levels[i]
