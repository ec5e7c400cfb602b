"""Continuous-time consistency (sCT of sCM, `--method scm`): TrigFlow through an EDM denoiser, the
tangent's formula and its zero for an exact consistency function, the gradient against a brute-force
computation, and a tiny run through the loop."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from ectune.data import load_dataset
from ectune.losses import scm_loss, scm_tangent, trigflow_consistency
from ectune.methods import METHODS
from ectune.models import build_denoiser
from ectune.precond import EDMPrecond
from ectune.presets import preset
from ectune.runs import train_run

SD = 0.5


def _trig(sigma):
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64) / SD)


def test_an_edm_denoiser_is_a_trigflow_consistency_function():
    """f(x_t, s) = D(x_t/cos s, σd·tan s) = cos s·x_t − σd·sin s·F with F = −F_EDM(x_t/σd, ln(σd tan s)/4)."""
    torch.manual_seed(0)
    net_cfg = dataclasses.replace(preset("tiny", "tune").net, img_resolution=8, in_channels=1)
    D = build_denoiser(net_cfg).eval()
    assert isinstance(D, EDMPrecond)
    s = _trig([0.002, 0.3, 2.0, 80.0]).float()
    x_t = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        f = trigflow_consistency(D, x_t, s)
        F_edm = D.net(x_t / SD, (torch.log(SD * torch.tan(s)) / 4), None)
    c, n = torch.cos(s).reshape(-1, 1, 1, 1), torch.sin(s).reshape(-1, 1, 1, 1)
    assert torch.allclose(f, c * x_t + SD * n * F_edm, atol=2e-5)


def test_the_jvp_through_an_edm_network_is_the_total_derivative():
    """scm_tangent's df/ds = g/cos s (warm-up 1) through a real EDMPrecond equals the central difference of
    f(x_t + h·v, s + h) in s (float32: agreement to ~1e-3 of the tangent's size; a lost σ tangent is O(1))."""
    torch.manual_seed(0)
    net_cfg = dataclasses.replace(preset("tiny", "tune").net, img_resolution=8, in_channels=1)
    D = build_denoiser(net_cfg).eval()
    s = _trig([0.05, 0.6, 5.0]).float()
    x_t, v = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    _, g = scm_tangent(D, x_t, s, v)
    df = g / torch.cos(s).reshape(-1, 1, 1, 1)
    h = 1e-3
    with torch.no_grad():
        fd = (trigflow_consistency(D, x_t + h * v, s + h) - trigflow_consistency(D, x_t - h * v, s - h)) / (2 * h)
    assert (df - fd).abs().max() < 2e-3 * fd.abs().max()
    with torch.no_grad():                                        # the control: without the s direction
        fd_x = (trigflow_consistency(D, x_t + h * v, s) - trigflow_consistency(D, x_t - h * v, s)) / (2 * h)
    assert (df - fd_x).abs().max() > 0.05 * fd.abs().max()


class Linear:
    """D(x, σ) = c_skip·x + c_out·F_θ(c_in·x, ln σ/4) with F_θ(y, n) = a·y + b·n + w: EDM preconditioning
    around a three-parameter network, float64."""

    def __init__(self, a=0.7, b=-0.3, w=0.05):
        self.theta = torch.tensor([a, b, w], dtype=torch.float64, requires_grad=True)

    def F(self, y, n):
        a, b, w = self.theta
        return a * y + b * n.reshape(-1, 1, 1, 1) + w

    def __call__(self, x, sigma):
        sig = sigma.reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = SD**2 / (sig**2 + SD**2), sig * SD / (sig**2 + SD**2).sqrt(), 1 / (sig**2 + SD**2).sqrt()
        return c_skip * x + c_out * self.F(c_in * x, torch.log(sigma) / 4)


@pytest.mark.parametrize("warmup", [1.0, 0.3])
def test_the_loss_gradient_is_scms_against_a_brute_force_tangent(warmup):
    """TrigFlow by hand, dF/ds by central differences: g = −cos²s(σd F − v) − warmup·cos s sin s(x_t + σd dF/ds),
    normalised g/(‖g‖ + c); the loss is ‖g‖² and its gradient −2 gᵀ∂F/∂θ (F = −F_θ(x_t/σd, ln(σd tan s)/4))."""
    g_ = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 4, 4, generator=g_, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 1, 4, 4, generator=g_, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.7, 20.0], dtype=torch.float64)
    D, c = Linear(), 0.1
    loss = scm_loss(D, x0, sigma, noise, warmup=warmup, c=c)

    s = torch.atan(sigma / SD).reshape(-1, 1, 1, 1)
    x_t = torch.cos(s) * x0 + torch.sin(s) * SD * noise
    v = torch.cos(s) * SD * noise - torch.sin(s) * x0

    def F(x, u):                                                     # TrigFlow's network: −F_EDM
        with torch.no_grad():
            return -D.F(x / SD, torch.log(SD * torch.tan(u.reshape(-1))) / 4)
    h = 1e-6
    dF = (F(x_t + h * v, s + h) - F(x_t - h * v, s - h)) / (2 * h)
    g = -torch.cos(s) ** 2 * (SD * F(x_t, s) - v) - warmup * torch.cos(s) * torch.sin(s) * (x_t + SD * dF)
    norm = g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    g = g / (norm + c)
    assert torch.allclose(loss, g.flatten(1).pow(2).sum(1), rtol=1e-7)
    loss.sum().backward()
    n = torch.log(SD * torch.tan(s))
    dF_dtheta = [-(x_t / SD), -(n / 4).expand_as(x_t), -torch.ones_like(x_t)]      # ∂F/∂(a, b, w)
    expected = torch.stack([(-2 * g * d).sum() for d in dF_dtheta])
    assert torch.allclose(D.theta.grad, expected, rtol=1e-6, atol=1e-9)


def test_the_tangent_of_an_exact_consistency_function_vanishes_along_the_pf_ode():
    """Gaussian data x0 ~ N(μ, s²) per pixel: f*(x, σ) = μ + s/√(s² + σ²)·(x − μ) is the PF-ODE's
    consistency function, so along the ODE's velocity E[v | x_t] its tangent is 0 (to float64 rounding);
    the denoiser E[x0 | x] is not consistent, and its tangent is not (the control)."""
    mu, sd = 0.3, 0.5
    consistent = lambda x, sig: mu + sd / (sd**2 + sig.reshape(-1, 1, 1, 1) ** 2).sqrt() * (x - mu)          # noqa: E731
    denoiser = lambda x, sig: mu + sd**2 / (sd**2 + sig.reshape(-1, 1, 1, 1) ** 2) * (x - mu)                # noqa: E731
    g_ = torch.Generator().manual_seed(2)
    sigma = torch.tensor([0.05, 0.5, 3.0, 40.0], dtype=torch.float64)
    s = torch.atan(sigma / SD)
    cs, sn = torch.cos(s).reshape(-1, 1, 1, 1), torch.sin(s).reshape(-1, 1, 1, 1)
    x_t = torch.randn(4, 1, 3, 3, generator=g_, dtype=torch.float64) * cs * 0.8 + 0.2
    sig = sigma.reshape(-1, 1, 1, 1)
    m = mu + sd**2 / (sd**2 + sig**2) * (x_t / cs - mu)                   # E[x0 | x_t]
    v_bar = cs * (x_t - cs * m) / sn - sn * m                            # E[cos s·σd·ε − sin s·x0 | x_t]
    _, g = scm_tangent(consistent, x_t, s, v_bar)
    _, g_control = scm_tangent(denoiser, x_t, s, v_bar)
    assert g.abs().max() < 1e-10 and g_control.abs().max() > 1e-2


@pytest.fixture
def blobs(tmp_path):
    path = tmp_path / "blobs.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (24, 1, 8, 8), dtype=np.uint8))
    return load_dataset(str(path)), str(path)


def test_a_tiny_scm_run_trains_and_freezes_its_warmup(tmp_path, blobs):
    """20 steps through the loop: finite losses, the tangent warm-up logged 0 → 1 over a tenth of the run
    (frozen at creation: continued to 30 steps it stays 2), and the weights moved."""
    import json
    ds, spec = blobs
    cfg = preset("tiny", "tune")
    net = dataclasses.replace(cfg.net, img_resolution=8, in_channels=1)
    cfg = dataclasses.replace(cfg, data=spec, net=net, steps=20, batch=4, ckpt_every=10, sample_every=10**6,
                              log_every=1, loss=dataclasses.replace(cfg.loss, method="scm"),
                              eval=dataclasses.replace(cfg.eval, every_kimg=0.0))
    D = build_denoiser(net)
    before = [p.detach().clone() for p in D.parameters()]
    r = train_run(cfg, tmp_path / "run", ds, D, device=torch.device("cpu"), progress=False)
    assert (r.status, r.step) == ("trained", 20)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"]["scm_warmup"] == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    warm = [rec["tangent_warmup"] for rec in log if "tangent_warmup" in rec]
    assert warm[0] < 1 and warm[-1] == 1 and all(math.isfinite(rec["loss"]) for rec in log if "loss" in rec)
    assert any(not torch.equal(a, b) for a, b in zip(before, r.state.D.parameters()))
    longer = dataclasses.replace(cfg, steps=30)
    r = train_run(longer, tmp_path / "run", ds, build_denoiser(net), device=torch.device("cpu"), progress=False)
    assert r.step == 30 and json.loads((tmp_path / "run" / "config.json").read_text())["loss"]["scm_warmup"] == 2
    assert METHODS["scm"].kind == "tune"


def test_scm_tunes_with_scms_time_distribution_unless_set(tiny_teacher, tmp_path):
    from ectune.start import configure, tune_base
    base = tune_base("scm", str(tiny_teacher / "teacher"), None, str(tiny_teacher / "d.npz"), tmp_path / "out")
    assert (base.cfg.loss.method, base.cfg.loss.P_mean, base.cfg.loss.P_std) == ("scm", -1.0, 1.4)
    cfg = configure(base.cfg, overrides=["loss.P_mean=-0.2"])
    assert (cfg.loss.P_mean, cfg.loss.P_std) == (-0.2, 1.4)
