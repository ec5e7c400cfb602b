"""Samplers: Heun against EDM's formula and the closed-form ODE solution; the consistency sampler."""

import math

import pytest
import torch

from ectune.sampling import (consistency_sampler, default_consistency_times, heun_nfe, heun_sampler,
                             sample_images, seeded_noise)
from ectune.schedules import karras_sigmas


def heun_reference(D, x, sigmas):
    """EDM Algorithm 1 (deterministic), written out plainly as a second reading of the formula."""
    x = x * sigmas[0]
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        d = (x - D(x, torch.full((x.shape[0],), s, dtype=x.dtype))) / s
        x_e = x + (s1 - s) * d
        if s1 != 0:
            d1 = (x_e - D(x_e, torch.full((x.shape[0],), s1, dtype=x.dtype))) / s1
            x_e = x + (s1 - s) * 0.5 * (d + d1)
        x = x_e
    return x


def exact_ode_solution(z, mu, s, sigma_max=80.0):
    """For x0 ~ N(mu, s²), the PF-ODE keeps (x − mu)/√(s² + σ²) constant: x(0) = mu + s·(x(σmax) − mu)/√(s² + σmax²)."""
    x_T = sigma_max * z
    return mu + s * (x_T - mu) / math.sqrt(s**2 + sigma_max**2)


def test_heun_matches_edm_formula(gaussian_denoiser):
    z = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    got = heun_sampler(gaussian_denoiser, z, num_steps=18)
    ref = heun_reference(gaussian_denoiser, z.clone(), karras_sigmas(18).tolist())
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-6)
    assert heun_nfe(18) == 35
    assert len(gaussian_denoiser.calls) == 2 * heun_nfe(18)   # 35 calls each: sampler and reference


def test_heun_converges_to_closed_form_solution(gaussian_denoiser):
    z = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    exact = exact_ode_solution(z, gaussian_denoiser.mu, gaussian_denoiser.s)
    errs = [(heun_sampler(gaussian_denoiser, z, num_steps=n).double() - exact).abs().max().item()
            for n in (18, 40, 100, 400)]
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 5e-4                 # converges to the closed-form endpoint
    assert errs[2] / errs[3] > 8           # second order: 4x the steps cuts the error ~16x


def test_one_step_consistency_is_D_at_80(gaussian_denoiser):
    z = torch.randn(3, 1, 4, 4)
    out = consistency_sampler(gaussian_denoiser, z, ts=(80.0,))
    torch.testing.assert_close(out, gaussian_denoiser(80 * z.double(), torch.full((3,), 80.0, dtype=torch.float64)).float())


def test_two_step_consistency_formula(gaussian_denoiser):
    z, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    out = consistency_sampler(gaussian_denoiser, z, ts=(80.0, 0.821), step_noise=[eps])
    x1 = gaussian_denoiser(80 * z.double(), torch.full((3,), 80.0, dtype=torch.float64))
    x2 = gaussian_denoiser(x1 + 0.821 * eps.double(), torch.full((3,), 0.821, dtype=torch.float64))
    torch.testing.assert_close(out, x2.float())


def test_consistency_generator_is_reproducible(gaussian_denoiser):
    z = torch.randn(2, 1, 4, 4)
    a = consistency_sampler(gaussian_denoiser, z, ts=(80.0, 2.0, 0.5), generator=torch.Generator().manual_seed(5))
    b = consistency_sampler(gaussian_denoiser, z, ts=(80.0, 2.0, 0.5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("ts", [(), (1.0, 2.0), (80.0, 0.0)])
def test_consistency_rejects_bad_times(gaussian_denoiser, ts):
    with pytest.raises(ValueError):
        consistency_sampler(gaussian_denoiser, torch.randn(1, 1, 2, 2), ts=ts)


def test_default_times():
    assert default_consistency_times(1) == [80.0]
    assert default_consistency_times(2, (1.5,)) == [80.0, 1.5]
    ts = default_consistency_times(3)
    assert len(ts) == 3 and ts[0] == 80.0 and ts[0] > ts[1] > ts[2] > 0


def test_seeded_noise_independent_of_batching():
    a = seeded_noise([3, 4, 5], (1, 4, 4), 2)
    b = seeded_noise([5], (1, 4, 4), 2)
    assert torch.equal(a[0][2], b[0][0]) and torch.equal(a[1][2], b[1][0])


def test_sample_images_same_seed_same_image_any_batch(gaussian_denoiser):
    full = sample_images(gaussian_denoiser, list(range(6)), (1, 4, 4), ts=(80.0, 1.5), batch=6)
    split = sample_images(gaussian_denoiser, list(range(6)), (1, 4, 4), ts=(80.0, 1.5), batch=4)
    assert torch.equal(full, split)
