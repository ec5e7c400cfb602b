"""Samplers: Heun against EDM's formula and the closed-form ODE solution; the consistency sampler."""

import math

import pytest
import torch

from ectune.sampling import (consistency_sampler, default_consistency_times, dpmpp2m_sampler, dpmpp_nfe,
                             heun_nfe, heun_sampler, sample_images, seeded_noise, Sampler)
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
    full = sample_images(gaussian_denoiser, list(range(6)), (1, 4, 4), Sampler.consistency((80.0, 1.5)), batch=6)
    split = sample_images(gaussian_denoiser, list(range(6)), (1, 4, 4), Sampler.consistency((80.0, 1.5)), batch=4)
    assert torch.equal(full, split)


# --- DPM-Solver++(2M)
def euler_reference(D, z, num_steps):
    """Euler on the PF-ODE dx/dσ = (x − D(x, σ))/σ over the same Karras grid: one D call per level."""
    sigmas = karras_sigmas(num_steps).tolist()
    x = z * sigmas[0]
    for s, s1 in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s1 - s) * (x - D(x, torch.full((x.shape[0],), s, dtype=x.dtype))) / s
    return x


@pytest.mark.parametrize("nfe", range(1, 36))
def test_dpmpp2m_nfe_is_exact(gaussian_denoiser, nfe):
    dpmpp2m_sampler(gaussian_denoiser, torch.randn(2, 1, 2, 2), num_steps=nfe)
    assert dpmpp_nfe(nfe) == nfe == len(gaussian_denoiser.calls)
    called = torch.stack([c[0] for c in gaussian_denoiser.calls])
    torch.testing.assert_close(called, karras_sigmas(nfe, append_zero=False))   # every positive level, once


def test_dpmpp2m_three_steps_by_hand(gaussian_denoiser):
    """NFE 3 written out: a DDIM step, a 2M step with r = h_0 / h_1, then the data prediction at σ_min."""
    D = gaussian_denoiser
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    s0, s1, s2 = karras_sigmas(3, append_zero=False).tolist()
    lam = [-math.log(s) for s in (s0, s1, s2)]
    h0, h1 = lam[1] - lam[0], lam[2] - lam[1]
    d0 = D(s0 * z, torch.full((3,), s0, dtype=torch.float64))
    x1 = s1 / s0 * (s0 * z) - (math.exp(-h0) - 1) * d0
    d1 = D(x1, torch.full((3,), s1, dtype=torch.float64))
    r = h0 / h1
    x2 = s2 / s1 * x1 - (math.exp(-h1) - 1) * ((1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0)
    x3 = D(x2, torch.full((3,), s2, dtype=torch.float64))
    torch.testing.assert_close(dpmpp2m_sampler(D, z, num_steps=3), x3.float())
    one = dpmpp2m_sampler(D, z, num_steps=1)
    torch.testing.assert_close(one, D(80 * z, torch.full((3,), 80.0, dtype=torch.float64)).float())


def test_dpmpp2m_second_order_convergence(gaussian_denoiser):
    z = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    exact = exact_ode_solution(z, gaussian_denoiser.mu, gaussian_denoiser.s)
    errs = [(dpmpp2m_sampler(gaussian_denoiser, z, num_steps=n).double() - exact).abs().max().item()
            for n in (35, 70, 140)]
    assert errs[-1] < 2e-3                                  # converges to the closed-form endpoint
    assert errs[0] / errs[1] > 3 and errs[1] / errs[2] > 3  # second order: 2x the steps cuts the error ~4x


def test_dpmpp2m_beats_euler_at_equal_nfe(gaussian_denoiser):
    z = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    exact = exact_ode_solution(z, gaussian_denoiser.mu, gaussian_denoiser.s)
    for nfe in (5, 9, 17, 35):
        dpm = (dpmpp2m_sampler(gaussian_denoiser, z, num_steps=nfe).double() - exact).abs().max().item()
        euler = (euler_reference(gaussian_denoiser, z, nfe) - exact).abs().max().item()
        assert dpm < euler / 1.5, (nfe, dpm, euler)


def test_sample_images_dpmpp2m_same_seed_same_image_any_batch(gaussian_denoiser):
    full = sample_images(gaussian_denoiser, list(range(6)), (1, 4, 4), Sampler.dpmpp2m(5), batch=6)
    split = sample_images(gaussian_denoiser, list(range(6)), (1, 4, 4), Sampler.dpmpp2m(5), batch=4)
    alone = sample_images(gaussian_denoiser, [4], (1, 4, 4), Sampler.dpmpp2m(5))
    assert torch.equal(full, split) and torch.equal(full[4:5], alone)
    assert len(gaussian_denoiser.calls) == 4 * 5           # batches 6, 4 + 2 and 1: five calls each


def test_cli_sample_dpmpp2m(tmp_path, capsys):
    import numpy as np

    from ectune.cli import main
    from ectune.demo import shipped_teacher
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(shipped_teacher()), "--sampler", "dpmpp2m", "--nfe", "3", "--n", "2",
                 "--out", str(out)]) == 0
    assert "dpmpp2m NFE 3" in capsys.readouterr().out
    with np.load(out) as z:
        assert z["images"].shape == (2, 1, 28, 28) and z["images"].dtype == np.uint8


# --- one signature over an explicit grid, and the frozen description of a sampler
def test_grid_samplers_are_the_named_samplers_bit_for_bit(gaussian_denoiser):
    from ectune.sampling import sample_consistency, sample_dpmpp_2m, sample_heun
    z, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    grid = karras_sigmas(5).tolist()
    x = z.to(torch.float64) * grid[0]
    assert torch.equal(sample_heun(gaussian_denoiser, x, grid), heun_sampler(gaussian_denoiser, z, num_steps=5))
    assert torch.equal(sample_dpmpp_2m(gaussian_denoiser, x, grid), dpmpp2m_sampler(gaussian_denoiser, z, num_steps=5))
    two = sample_consistency(gaussian_denoiser, z.to(torch.float64) * 80, [80.0, 0.8, 0.0], step_noise=[eps])
    assert torch.equal(two, consistency_sampler(gaussian_denoiser, z, (80.0, 0.8), step_noise=[eps]))


def test_sampler_description_records_what_results_record():
    heun, dpm, cons = Sampler.heun(18), Sampler.dpmpp2m(7), Sampler.consistency([80, 1.5])
    assert heun.spec == {"name": "heun", "num_steps": 18, "nfe": 35} and heun.nfe == heun_nfe(18)
    assert dpm.spec == {"name": "dpmpp2m", "nfe": 7} and dpm.sigmas == tuple(karras_sigmas(7).tolist())
    assert cons.spec == {"name": "consistency", "ts": [80.0, 1.5], "nfe": 2} and cons.sigmas == (80.0, 1.5, 0.0)
    assert (heun.label, dpm.label, cons.label) == ("heun 18 steps", "dpmpp2m NFE 7", "consistency ts=[80.0, 1.5]")
    assert Sampler.heun(18) == heun and hash(Sampler.heun(18)) == hash(heun)      # frozen: a value
    with pytest.raises(AttributeError):
        heun.name = "dpmpp2m"


@pytest.mark.parametrize("name, sigmas", [("heun", (80.0, 1.0)), ("heun", (1.0, 80.0, 0.0)), ("dpmpp2m", (0.0,))])
def test_a_sampler_grid_must_decrease_to_zero(name, sigmas):
    with pytest.raises(ValueError):
        Sampler(name, sigmas)


def test_sample_images_runs_the_description(gaussian_denoiser):
    sampler = Sampler.heun(3)
    x = sample_images(gaussian_denoiser, [7, 8], (1, 4, 4), sampler)
    (z,) = seeded_noise([7, 8], (1, 4, 4))
    assert torch.equal(x, heun_sampler(gaussian_denoiser, z, num_steps=3))
