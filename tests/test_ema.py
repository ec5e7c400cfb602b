"""EMA: EDM2 power-function profile and the fixed-rate average."""

import math

import pytest
import torch
from torch import nn

from ectune.ema import EMA, power_beta, sigma_rel_to_gamma


@pytest.mark.parametrize("sigma_rel", [0.03, 0.05, 0.1, 0.2])
def test_gamma_solves_edm2_relation(sigma_rel):
    g = sigma_rel_to_gamma(sigma_rel)
    assert math.isclose((g + 1) / ((g + 2) ** 2 * (g + 3)), sigma_rel**2, rel_tol=1e-9)


def test_power_ema_is_weighted_average_with_power_profile():
    """After T updates the power EMA equals Σ w_t θ_t with w_t ∝ t^γ (EDM2 eq. 2, discretised)."""
    gamma, T = sigma_rel_to_gamma(0.1), 200
    thetas = torch.randn(T)
    ema = None
    for t in range(1, T + 1):
        beta = power_beta(t, gamma)
        ema = thetas[0] if t == 1 else beta * ema + (1 - beta) * thetas[t - 1]
    # closed form of the recursion: w_t = (1 - β_t) Π_{s>t} β_s
    w = torch.tensor([(1 - power_beta(t, gamma)) * math.prod(power_beta(s, gamma) for s in range(t + 1, T + 1))
                      for t in range(1, T + 1)], dtype=torch.float64)
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-9)
    assert math.isclose(ema.item(), (w * thetas.double()).sum().item(), rel_tol=1e-4, abs_tol=1e-5)
    ratio = w[-1] / w[T // 2 - 1]                                     # ≈ (T / (T/2))^γ
    assert math.isclose(ratio.item(), 2**gamma, rel_tol=0.1)


def test_power_ema_forgets_the_start_in_proportion_to_run_length():
    """The teacher's share in the EMA after T steps is ~0 for the power EMA, not β^T as for a fixed rate."""
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)                     # "teacher" weights
    ema = EMA(net, "power", sigma_rel=0.05)
    with torch.no_grad():
        net.weight.fill_(1.0)                     # online weights move away at once
    for t in range(1, 1049):
        ema.update(net, t)
    assert ema.module.weight.item() == pytest.approx(1.0)
    fixed = EMA(nn.Linear(1, 1, bias=False).requires_grad_(False), "fixed", beta=0.999)
    fixed.module.weight.data.fill_(0.0)
    for t in range(1, 1049):
        fixed.update(net, t)
    assert fixed.module.weight.item() == pytest.approx(1 - 0.999**1048)     # ~35% teacher left


def test_ema_module_is_frozen_and_separate():
    net = nn.Linear(2, 2)
    ema = EMA(net, "fixed", beta=0.5)
    assert all(not p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not torch.equal(ema.module.weight, net.weight)


def test_bad_kind_or_width():
    with pytest.raises(ValueError):
        EMA(nn.Linear(1, 1), "exponential")
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.5)
