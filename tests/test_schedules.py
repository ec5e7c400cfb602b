"""Noise schedules: ECT's mapping function, stages, Karras grid, lognormal sampling."""

import math

import pytest
import torch

from ectune.schedules import ect_r, ect_stage, ict_num_levels, karras_sigmas, lognormal_sigma


def ect_r_reference(t, s, q, k, b):
    n = 1 + k / (1 + math.exp(b * t))          # 1 + k·sigmoid(−b·t)
    return max(0.0, t * (1 - n / q ** (s + 1)))


@pytest.mark.parametrize("q,k,b", [(2.0, 8.0, 1.0), (4.0, 8.0, 1.0), (256.0, 8.0, 1.0), (2.0, 4.0, 0.5)])
def test_ect_r_matches_formula(q, k, b):
    t = torch.logspace(-3, math.log10(80), 200, dtype=torch.float64)
    for s in range(8):
        r = ect_r(t, s, q=q, k=k, b=b)
        expected = torch.tensor([ect_r_reference(ti, s, q, k, b) for ti in t.tolist()], dtype=torch.float64)
        torch.testing.assert_close(r, expected, rtol=1e-12, atol=1e-15)


def test_ect_r_in_range_and_monotone_in_stage():
    t = lognormal_sigma(10000, -1.1, 2.0, generator=torch.Generator().manual_seed(1)).double()
    prev = torch.zeros_like(t)
    for s in range(10):
        r = ect_r(t, s)
        assert (r >= 0).all() and (r < t).all()
        assert (r >= prev).all()
        prev = r
    # the final CIFAR-10 stage (s = 7) has Δt/t = n(t)/256
    n = 1 + 8 * torch.sigmoid(-t)
    torch.testing.assert_close((t - ect_r(t, 7)) / t, n / 256)


def test_early_stage_gives_r_zero_for_small_t():
    t = torch.tensor([0.01, 0.1, 50.0])
    r = ect_r(t, 0)
    assert r[0] == 0 and r[1] == 0 and r[2] > 0


def test_stage_index():
    assert [ect_stage(i, 25000) for i in (0, 24999, 25000, 199999)] == [0, 0, 1, 7]
    with pytest.raises(ValueError):
        ect_stage(1, 0)


def test_karras_sigmas_formula_and_ends():
    s = karras_sigmas(18)
    assert len(s) == 19 and s[-1] == 0
    torch.testing.assert_close(s[0], torch.tensor(80.0, dtype=torch.float64))
    torch.testing.assert_close(s[17], torch.tensor(0.002, dtype=torch.float64))
    i = 5
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(s[i].item(), ref, rel_tol=1e-12)
    assert (s[:-1][1:] < s[:-1][:-1]).all()


def test_lognormal_moments():
    s = lognormal_sigma(200000, -1.2, 1.2, generator=torch.Generator().manual_seed(0))
    ls = s.log()
    assert abs(ls.mean().item() + 1.2) < 0.02 and abs(ls.std().item() - 1.2) < 0.02


def test_ict_curriculum_doubles_from_10_to_1280():
    total = 400000
    levels = [ict_num_levels(k, total) for k in range(0, total, 1000)]
    assert levels[0] == 11 and levels[-1] == 1281
    assert sorted(set(levels)) == [11, 21, 41, 81, 161, 321, 641, 1281]


def test_ict_pairs_are_adjacent_karras_levels_drawn_by_the_discretised_lognormal():
    from math import erf, log, sqrt
    from ectune.schedules import ict_t_r
    levels = 11
    grid = karras_sigmas(levels, append_zero=False).flip(0).float()            # ascending σ_1 < … < σ_N
    t, r = ict_t_r(200000, levels, P_mean=-1.1, P_std=2.0, generator=torch.Generator().manual_seed(0))
    i = torch.searchsorted(grid, r)
    assert torch.equal(grid[i], r) and torch.equal(grid[i + 1], t)            # r = σ_i, t = σ_{i+1}
    assert (r >= 0.002 - 1e-6).all() and (t <= 80 + 1e-3).all()
    cdf = [erf((log(s) - (-1.1)) / (sqrt(2) * 2.0)) for s in grid.double().tolist()]
    p = torch.tensor([b - a for a, b in zip(cdf, cdf[1:])])
    p /= p.sum()
    freq = torch.bincount(i, minlength=levels - 1).double() / len(i)
    assert (freq - p).abs().max() < 0.005                                      # 200k draws: σ ≈ 0.001


def test_ict_needs_two_levels():
    from ectune.schedules import ict_t_r
    with pytest.raises(ValueError):
        ict_t_r(4, 1)
