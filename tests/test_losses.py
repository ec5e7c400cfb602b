"""EDM and ECT losses against their formulas, on analytic and tiny learned denoisers."""

import math

import pytest
import torch
from torch import nn

from ectune.losses import ect_loss, edm_loss
from ectune.precond import EDMPrecond


def test_edm_loss_matches_formula(gaussian_denoiser):
    x0, noise = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randn(5, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 2.0, 40.0], dtype=torch.float64)
    got = edm_loss(gaussian_denoiser, x0, sigma, noise)
    for i in range(5):
        s = sigma[i].item()
        lam = (s**2 + 0.25) / (s * 0.5) ** 2
        D = gaussian_denoiser(x0[i:i + 1] + s * noise[i:i + 1], sigma[i:i + 1])
        assert math.isclose(got[i].item(), lam * ((D - x0[i:i + 1]) ** 2).sum().item(), rel_tol=1e-12)


def ect_reference(D, x0, t, r, noise, c, weighting, sd=0.5):
    """ECT.md §4 steps 3–8 written out per sample with plain Python arithmetic."""
    out = []
    for i in range(len(t)):
        ti, ri = t[i].item(), r[i].item()
        online = D(x0[i:i + 1] + ti * noise[i:i + 1], torch.tensor([ti], dtype=x0.dtype))
        target = x0[i:i + 1] if ri == 0 else D(x0[i:i + 1] + ri * noise[i:i + 1], torch.tensor([ri], dtype=x0.dtype))
        d = ((online - target) ** 2).sum().item()
        d = math.sqrt(d + c * c) - c
        w = 1 / (ti - ri) if weighting == "inv_dt" else 1 / ti**2 + 1 / sd**2
        out.append(w * d)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("weighting", ["inv_dt", "snr"])
@pytest.mark.parametrize("c", [0.0, 0.06])
def test_ect_loss_matches_formula(gaussian_denoiser, weighting, c):
    x0 = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.05, 0.3, 1.0, 3.0, 20.0, 80.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.1, 0.0, 2.9, 10.0, 79.0], dtype=torch.float64)   # includes r = 0 rows
    got = ect_loss(gaussian_denoiser, x0, t, r, noise, c=c, weighting=weighting)
    torch.testing.assert_close(got, ect_reference(gaussian_denoiser, x0, t, r, noise, c, weighting), rtol=1e-10, atol=0)


def test_ect_never_calls_D_at_zero(gaussian_denoiser):
    x0 = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.2, 1.0, 5.0], dtype=torch.float64)
    r = torch.zeros(4, dtype=torch.float64)
    ect_loss(gaussian_denoiser, x0, t, r, torch.randn_like(x0))
    assert all((c > 0).all() for c in gaussian_denoiser.calls)


def test_ect_rejects_r_not_below_t(gaussian_denoiser):
    x0 = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError):
        ect_loss(gaussian_denoiser, x0, torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0]), torch.randn_like(x0))


class Scale(nn.Module):
    """D(x, σ) = a·x/(1 + σ): one parameter, so the gradient can be checked by hand."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None):
        return self.a * x / (1 + sigma.reshape(-1, 1, 1, 1))


def test_gradient_flows_only_through_online_branch():
    D = Scale()
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.4, 1.5], dtype=torch.float64)
    ect_loss(D, x0, t, r, noise).sum().backward()
    a = 0.7
    expected = 0.0
    for i in range(3):
        u = (x0[i] + t[i] * noise[i]) / (1 + t[i])                     # d online / d a
        target = x0[i] if r[i] == 0 else a * (x0[i] + r[i] * noise[i]) / (1 + r[i])
        diff = a * u - target
        norm = diff.pow(2).sum().sqrt()
        expected += (1 / (t[i] - r[i])) * (diff * u).sum() / norm     # d‖diff‖/da, target constant
    assert math.isclose(D.a.grad.item(), expected.item(), rel_tol=1e-10)


class DropNet(nn.Module):
    """A raw network with heavy dropout: F(x_in, c_noise) = dropout(conv(x_in)) + c_noise."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x_in, noise_labels, class_labels=None):
        return self.drop(self.conv(x_in)) + noise_labels.reshape(-1, 1, 1, 1)


def test_shared_dropout_masks_make_distance_vanish_as_r_approaches_t():
    D = EDMPrecond(DropNet()).train()
    x0 = torch.randn(8, 1, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.full((8,), 1.0)
    d = {}
    for gap in (1e-2, 1e-4):
        d[gap] = ect_loss(D, x0, t, t - gap, noise, weighting="snr") / 5   # snr weight at t = 1 is 5
    assert d[1e-4].max() < 1e-3
    assert (d[1e-4] < 0.02 * d[1e-2]).all()                  # d = O(Δt): it vanishes as r → t
    # Without shared masks the two branches differ by the dropout noise, far above that bound.
    with torch.no_grad():
        a, b = D(x0 + noise, t), D(x0 + (1 - 1e-4) * noise, t - 1e-4)
    assert ((a - b) ** 2).flatten(1).sum(1).sqrt().min() > 0.1


def test_ect_loss_deterministic_given_inputs_and_advances_rng_once():
    D = EDMPrecond(DropNet()).train()
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t, r = torch.full((4,), 2.0), torch.full((4,), 1.0)
    torch.manual_seed(3)
    l1 = ect_loss(D, x0, t, r, noise)
    after_loss = torch.randn(1)
    torch.manual_seed(3)
    l2 = ect_loss(D, x0, t, r, noise)
    torch.testing.assert_close(l1, l2)
    torch.manual_seed(3)
    D(x0, t)                               # the loss draws exactly one forward pass of dropout noise
    assert torch.equal(torch.randn(1), after_loss)
