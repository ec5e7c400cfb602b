"""Exponential moving averages of the weights: a fixed rate, or EDM2's power-function EMA.

The power-function EMA (Karras et al. 2024, EDM2 §3) averages with β_t = (1 − 1/t)^(γ+1) at step t,
so its averaging length is a fixed fraction σ_rel of the run so far, whatever the run's length. A
fixed β = 0.999 after 1k tuning steps is still about a third teacher: a trap for short tuning runs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent γ whose power-function EMA has relative width σ_rel (EDM2 eq. 3).

    σ_rel² = (γ+1) / ((γ+2)²(γ+3)) ⇔ γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0; largest real root.
    """
    if not 0 < sigma_rel < 0.28:
        raise ValueError(f"sigma_rel must be in (0, 0.28), got {sigma_rel}")
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(step: int, gamma: float) -> float:
    """β_t = (1 − 1/t)^(γ+1) for the t-th update (t ≥ 1; β_1 = 0 copies the weights)."""
    return (1.0 - 1.0 / max(step, 1)) ** (gamma + 1.0)


class EMA:
    """A frozen copy of a module whose parameters track the online ones.

    kind "power": EDM2 power-function EMA with width `sigma_rel`; kind "fixed": constant `beta`.
    `update(net, step)` is called after optimizer step number `step` (1, 2, …) of this run.
    """

    def __init__(self, net: nn.Module, kind: str = "power", sigma_rel: float = 0.05, beta: float = 0.9999):
        if kind not in ("power", "fixed"):
            raise ValueError(f"unknown EMA kind {kind!r}; use 'power' or 'fixed'")
        self.kind, self.beta_fixed = kind, float(beta)
        self.gamma = sigma_rel_to_gamma(sigma_rel) if kind == "power" else None
        self.module = copy.deepcopy(net).eval().requires_grad_(False)

    def beta(self, step: int) -> float:
        return power_beta(step, self.gamma) if self.kind == "power" else self.beta_fixed

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        beta = self.beta(step)
        for p_ema, p in zip(self.module.parameters(), net.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), net.buffers()):
            b_ema.copy_(b)
