"""EDM preconditioning: Table 1 formulas and the boundary condition D(x, 0) = x."""

import math

import torch
from torch import nn

from ectune.precond import EDMPrecond, c_noise, edm_coefficients


class Affine(nn.Module):
    """F(x_in, c_noise) = 2·x_in + c_noise: simple enough to check D by hand."""

    def forward(self, x_in, noise_labels, class_labels=None):
        return 2 * x_in + noise_labels.reshape(-1, 1, 1, 1)


def test_coefficients_match_table1():
    sd = 0.5
    for s in [0.002, 0.1, 0.5, 1.0, 80.0]:
        c_skip, c_out, c_in = edm_coefficients(torch.tensor(s, dtype=torch.float64), sd)
        assert math.isclose(c_skip.item(), sd**2 / (s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(c_out.item(), s * sd / math.sqrt(s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(c_in.item(), 1 / math.sqrt(s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(c_noise(torch.tensor(s, dtype=torch.float64)).item(), math.log(s) / 4, rel_tol=1e-12)


def test_coefficients_boundary_and_unit_variance():
    sigma = torch.tensor([0.0, 0.3, 2.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm_coefficients(sigma)
    assert c_skip[0] == 1 and c_out[0] == 0
    # EDM's design: the training target of F has unit variance, c_skip² σd² + c_out² = σd² ... equivalently
    # c_out² = σ² σd² / (σ² + σd²) and c_skip = σd² c_in².
    torch.testing.assert_close(c_skip, 0.25 * c_in**2)


def test_precond_formula():
    D = EDMPrecond(Affine(), sigma_data=0.5)
    x = torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    c_skip, c_out, c_in = (c.reshape(-1, 1, 1, 1) for c in edm_coefficients(sigma))
    expected = c_skip * x + c_out * (2 * c_in * x + (sigma.log() / 4).reshape(-1, 1, 1, 1))
    torch.testing.assert_close(D(x, sigma), expected)


def test_boundary_condition_exact_at_zero_and_limit():
    D = EDMPrecond(Affine())
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(D(x, torch.zeros(2)), x)
    for s in [1e-3, 1e-5, 1e-7]:
        assert (D(x, torch.full((2,), s)) - x).abs().max() < 50 * s


def test_zero_sigma_rows_do_not_evaluate_log_zero():
    D = EDMPrecond(Affine())
    x = torch.randn(2, 1, 4, 4)
    out = D(x, torch.tensor([0.0, 1.0]))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], x[0])


def test_scalar_sigma_broadcasts():
    D = EDMPrecond(Affine())
    x = torch.randn(4, 1, 2, 2)
    torch.testing.assert_close(D(x, 0.7), D(x, torch.full((4,), 0.7)))


def test_official_ect_eval_shift_only_in_eval_mode():
    """ECT's ECMPrecond in eval mode: c_skip = σd²/((σ−σmin)² + σd²), c_out = (σ−σmin)·σd/√(σ² + σd²)."""
    D = EDMPrecond(Affine(), sigma_data=0.5, eval_sigma_min=0.003)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64).float()
    sigma = torch.tensor([0.003, 0.01, 1.0, 80.0])
    plain = EDMPrecond(Affine(), sigma_data=0.5)(x, sigma)
    assert torch.equal(D.train()(x, sigma), plain)                       # training: EDM's coefficients
    out = D.eval()(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        c_skip = 0.25 / ((s - 0.003) ** 2 + 0.25)
        c_out = (s - 0.003) * 0.5 / math.sqrt(s**2 + 0.25)
        c_in = 1 / math.sqrt(s**2 + 0.25)
        want = c_skip * x[i] + c_out * (2 * c_in * x[i] + math.log(s) / 4)
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0], x[0])                              # D(x, σmin) = x
    assert not torch.allclose(out[1], plain[1])
