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


def test_pseudo_huber_with_c0_has_a_finite_gradient_at_zero_distance():
    from ectune.losses import pseudo_huber
    d = torch.zeros(3, requires_grad=True)
    pseudo_huber(d, 0.0).sum().backward()
    assert torch.isfinite(d.grad).all()
    assert pseudo_huber(torch.tensor([4.0]), 0.0).item() == 2.0


def _exact_ode(x_t, t, r, s=0.5, mu=0.3):
    """PF-ODE of Gaussian data N(mu, s²): x(σ) − mu scales with √(s² + σ²)."""
    ratio = ((s**2 + r**2) / (s**2 + t**2)).sqrt().reshape(-1, 1, 1, 1)
    return mu + (x_t - mu) * ratio


def test_teacher_ode_step_euler_and_heun_against_the_exact_flow(gaussian_denoiser):
    from ectune.losses import teacher_ode_step
    x_t = torch.randn(4, 1, 4, 4, dtype=torch.float64) * 3
    t = torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    r = torch.tensor([2.7, 0.9, 0.0, 1.8], dtype=torch.float64)
    euler = teacher_ode_step(gaussian_denoiser, x_t, t, r, solver="euler")
    heun = teacher_ode_step(gaussian_denoiser, x_t, t, r, solver="heun")
    d_t = (x_t - gaussian_denoiser(x_t, t)) / t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(euler, x_t + (r - t).reshape(-1, 1, 1, 1) * d_t)
    exact = _exact_ode(x_t, t, r)
    err_e = (euler - exact).flatten(1).abs().max(1).values
    err_h = (heun - exact).flatten(1).abs().max(1).values
    pos = r > 0
    assert (err_h[pos] < 0.2 * err_e[pos]).all()                               # second order beats first
    torch.testing.assert_close(heun[2], gaussian_denoiser(x_t[2:3], t[2:3])[0])  # r = 0: the teacher's x0
    assert not any((c == 0).any() for c in gaussian_denoiser.calls)             # never called at σ = 0


def test_cd_loss_matches_its_formula_per_sample(gaussian_denoiser):
    from ectune.losses import cd_loss, teacher_ode_step
    student = GaussianStudent()
    x0, noise = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    r = torch.tensor([2.7, 0.0, 0.4, 1.8], dtype=torch.float64)
    got = cd_loss(student, gaussian_denoiser, x0, t, r, noise, c=0.03)
    for i in range(4):
        x_t = x0[i:i + 1] + t[i] * noise[i:i + 1]
        x_r = teacher_ode_step(gaussian_denoiser, x_t, t[i:i + 1], r[i:i + 1])
        target = x_r if r[i] == 0 else student(x_r, r[i:i + 1])
        d = ((student(x_t, t[i:i + 1]) - target) ** 2).sum().item()
        want = (math.sqrt(d + 0.03**2) - 0.03) / (t[i] - r[i]).item()
        assert math.isclose(got[i].item(), want, rel_tol=1e-10)


def test_cd_differs_from_ect_only_in_the_r_point(gaussian_denoiser):
    """With the exact denoiser as teacher, x_r from the teacher's ODE lies on the trajectory of x_t;
    ECT's x_r = x0 + r·ε does not — so the two losses differ, and CD with an exact student is ~0."""
    from ectune.losses import cd_loss
    x0, noise = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    t = torch.full((6,), 1.0, dtype=torch.float64)
    r = torch.full((6,), 0.95, dtype=torch.float64)

    def consistency_fn(x, sigma, class_labels=None):      # the exact consistency function of the Gaussian
        return _exact_ode(x, torch.as_tensor(sigma).reshape(-1), torch.zeros(x.shape[0], dtype=x.dtype))

    cd = cd_loss(consistency_fn, gaussian_denoiser, x0, t, r, noise)
    ect = ect_loss(consistency_fn, x0, t, r, noise)
    assert cd.max() < 1e-3 * ect.min()


class GaussianStudent:
    """A denoiser-shaped function with no special relation to the teacher (for formula checks)."""

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return 0.7 * x / (1 + sigma) + 0.1 * sigma


def test_losses_and_samplers_take_a_plain_two_argument_denoiser():
    """The README's promise: any callable D(x, sigma) works (labels are passed only when there are any)."""
    from ectune.losses import cd_loss, edm_loss, sct_loss
    from ectune.sampling import consistency_sampler, dpmpp2m_sampler, heun_sampler

    def D(x, sigma):                                        # exact denoiser of N(0, 0.5²) data
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return 0.25 / (0.25 + s**2) * x
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t, r = torch.tensor([0.5, 2.0, 10.0]), torch.tensor([0.2, 0.0, 5.0])
    for loss in (edm_loss(D, x0, t, noise), ect_loss(D, x0, t, r, noise), cd_loss(D, D, x0, t, r, noise),
                 sct_loss(D, x0, t, r, noise, torch.randn(5, 1, 4, 4))):
        assert loss.shape == (3,) and torch.isfinite(loss).all()
    z = torch.randn(2, 1, 4, 4)
    for x in (heun_sampler(D, z, num_steps=3), dpmpp2m_sampler(D, z, num_steps=3), consistency_sampler(D, z)):
        assert x.shape == z.shape and torch.isfinite(x).all()
