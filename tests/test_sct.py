"""The variance-reduced r-point (stable target field estimate; SCT on top of ECT)."""

import dataclasses

import numpy as np
import pytest
import torch

from ectune.checkpoint import read_weights
from ectune.cli import main
from ectune.losses import ect_loss, pseudo_huber, sct_loss, stf_clean_estimate


def brute_force_posterior_mean(x_t: np.ndarray, t: float, data: np.ndarray) -> np.ndarray:
    """E[x0 | x_t] for x0 uniform over the rows of `data` and x_t = x0 + t·ε, in float64."""
    log_p = np.array([-np.sum((x_t - x) ** 2) / (2 * t * t) for x in data])
    p = np.exp(log_p - log_p.max())
    return (p / p.sum()) @ data


def test_estimate_is_the_posterior_mean_of_a_finite_dataset():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 1, 2, 3))
    for i, t in [(0, 0.05), (3, 0.7), (6, 5.0)]:
        x0 = torch.tensor(data[i:i + 1])
        x_t = x0 + t * torch.randn(1, 1, 2, 3, dtype=torch.float64)
        refs = torch.tensor(np.delete(data, i, axis=0))
        got = stf_clean_estimate(x_t, torch.tensor([t], dtype=torch.float64), x0, refs)
        want = brute_force_posterior_mean(x_t.numpy().ravel(), t, data.reshape(7, -1))
        np.testing.assert_allclose(got.numpy().ravel(), want, rtol=1e-10, atol=1e-12)


def test_small_t_gives_the_own_sample_and_large_t_the_mean():
    x0, refs = torch.randn(4, 1, 3, 3), torch.randn(9, 1, 3, 3)
    x_t = x0 + 1e-3 * torch.randn_like(x0)
    torch.testing.assert_close(stf_clean_estimate(x_t, torch.full((4,), 1e-3), x0, refs), x0)
    far = stf_clean_estimate(x0, torch.full((4,), 1e4), x0, refs)      # t → ∞: the plain average
    mean = (x0.unsqueeze(1) + refs.sum(0)) / 10
    torch.testing.assert_close(far, mean.squeeze(1), rtol=1e-4, atol=1e-4)


def test_only_references_of_the_same_class_count():
    x0, refs = torch.randn(2, 1, 3, 3), torch.randn(6, 1, 3, 3)
    labels, ref_labels = torch.tensor([0, 1]), torch.tensor([0, 1, 1, 0, 2, 2])
    x_t, t = x0 + torch.randn_like(x0), torch.tensor([1.0, 1.0])
    got = stf_clean_estimate(x_t, t, x0, refs, labels=labels, ref_labels=ref_labels)
    for row, cls in enumerate([0, 1]):
        same = refs[ref_labels == cls]
        want = stf_clean_estimate(x_t[row:row + 1], t[:1], x0[row:row + 1], same)
        torch.testing.assert_close(got[row:row + 1], want)


def test_one_hot_weights_give_ects_loss(gaussian_denoiser):
    x0, noise = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    t, r = torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0]), torch.tensor([0.05, 0.0, 0.9, 2.0, 10.0])
    far = x0[:3] + 1e4                                             # references nobody is near: w one-hot
    sct = sct_loss(gaussian_denoiser, x0, t, r, noise, far, c=0.01)
    ect = ect_loss(gaussian_denoiser, x0, t, r, noise, c=0.01)
    torch.testing.assert_close(sct, ect, rtol=1e-5, atol=1e-6)


def test_r_point_is_an_euler_step_toward_the_estimate_and_r0_targets_it(gaussian_denoiser):
    x0, noise, refs = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(8, 1, 4, 4)
    t, r = torch.tensor([2.0, 1.0, 0.7]), torch.tensor([1.0, 0.0, 0.0])
    x_t = x0 + t.reshape(-1, 1, 1, 1) * noise
    x0_hat = stf_clean_estimate(x_t, t, x0, refs)
    x_r = x_t - ((t - r) / t).reshape(-1, 1, 1, 1) * (x_t - x0_hat)
    target = torch.where((r > 0).reshape(-1, 1, 1, 1), gaussian_denoiser(x_r, torch.where(r > 0, r, t)), x_r)
    want = pseudo_huber((gaussian_denoiser(x_t, t) - target).pow(2).flatten(1).sum(1), 0.0) / (t - r)
    torch.testing.assert_close(sct_loss(gaussian_denoiser, x0, t, r, noise, refs), want)


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sct")
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), labels=rng.integers(0, 3, 40))
    assert main(["pretrain", "--preset", "tiny", "--data", str(root / "d.npz"), "--steps", "2",
                 "--out", str(root / "teacher"), "--no-progress"]) == 0
    return root


def test_tune_method_sct_resumes_bit_identically(teacher_and_data, tmp_path):
    root = teacher_and_data
    common = ["tune", "--method", "sct", "--teacher", str(root / "teacher"), "--data", str(root / "d.npz"),
              "--batch", "8", "--set", "loss.sct_refs=16", "--set", "ckpt_every=2", "--no-progress"]
    assert main([*common, "--steps", "4", "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--steps", "2", "--out", str(tmp_path / "cut")]) == 0
    assert main([*common, "--steps", "4", "--out", str(tmp_path / "cut")]) == 0      # continued
    cfg, a, _ = read_weights(tmp_path / "full")
    _, b, _ = read_weights(tmp_path / "cut")
    assert cfg.loss.method == "sct" and cfg.loss.sct_refs == 16
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sct_draws_references_from_the_run_generator_only():
    from ectune.presets import preset
    from ectune.training import draw
    cfg = preset("tiny", "tune")
    sct = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, method="sct", sct_refs=32))
    a = draw(sct, 8, (1, 4, 4), 3, torch.Generator().manual_seed(5), n_items=100)
    b = draw(sct, 8, (1, 4, 4), 3, torch.Generator().manual_seed(5), n_items=100)
    ect = draw(cfg, 8, (1, 4, 4), 3, torch.Generator().manual_seed(5), n_items=100)
    assert torch.equal(a.refs, b.refs) and a.refs.shape == (32,) and int(a.refs.max()) < 100
    assert torch.equal(a.t, ect.t) and torch.equal(a.r, ect.r) and torch.equal(a.noise, ect.noise)
    assert ect.refs is None                                       # exact ECT draws nothing more
