"""Metrics: formulas against closed forms and independent references, then the shipped classifier."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ectune.errors import EctuneError
from ectune.metrics import (
    FeatureStats,
    FMNISTClassifier,
    classifier_features,
    classifier_hash,
    fd_against_reference,
    frechet_distance,
    kid,
    load_classifier,
    precision_recall,
    reference_stats,
)
from ectune.metrics.classifier import DEFAULT_PATH, FEATURE_DIM, read_metadata


def _random_cov(rng, d, n=None):
    """A full-rank (n > d) or singular (n ≤ d) sample covariance (d, d)."""
    x = rng.standard_normal((n or 3 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(x, rowvar=False)


def _fd_reference(mu1, s1, mu2, s2):
    """FD through eigendecompositions: Tr (Σ1Σ2)^½ = Σ √λ(Σ1^½ Σ2 Σ1^½), no sqrtm involved."""
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())


# --- Fréchet distance
def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(64), _random_cov(rng, 64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_matches_eigen_reference_and_is_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    s1, s2 = _random_cov(rng, 32), _random_cov(rng, 32)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(_fd_reference(mu1, s1, mu2, s2), rel=1e-7)
    assert fd == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_frechet_distance_handles_singular_covariances():
    """Fewer samples than dimensions: Σ1Σ2 is singular; eps·I keeps it finite and close to the reference."""
    rng = np.random.default_rng(3)
    s1, s2 = _random_cov(rng, 16, n=5), _random_cov(rng, 16, n=5)
    mu = np.zeros(16)
    fd = frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(fd) and fd == pytest.approx(_fd_reference(mu, s1, mu, s2), rel=1e-3)


def test_frechet_distance_of_identical_singular_statistics_is_zero():
    """A dead feature (always 0) makes Σ singular; the eps regularisation must not bias FD(x, x)."""
    sigma = np.diag([2.0, 1.0, 0.0])
    assert abs(frechet_distance(np.ones(3), sigma, np.ones(3), sigma)) < 1e-9


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(EctuneError, match="imaginary"):  # not a covariance: (Σ1Σ2)^½ is complex
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(EctuneError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(EctuneError, match="NaN"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_frechet_distance_is_non_negative_and_symmetric(d, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((40, d)), 2 * rng.standard_normal((40, d)) + 1
    sa, sb = FeatureStats().update(a).mean_cov(), FeatureStats().update(b).mean_cov()
    fd = frechet_distance(*sa, *sb)
    assert fd > -1e-9
    assert fd == pytest.approx(frechet_distance(*sb, *sa), rel=1e-6, abs=1e-9)


# --- FeatureStats
def test_feature_stats_equals_numpy_mean_and_cov():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 12)) * 3 + 5
    stats = FeatureStats()
    for chunk in np.array_split(x, 7):
        stats.update(torch.from_numpy(chunk).float() if len(chunk) % 2 else chunk)
    mu, sigma = stats.mean_cov()
    x32 = np.concatenate([c.astype(np.float32).astype(np.float64) if len(c) % 2 else c for c in np.array_split(x, 7)])
    assert mu.dtype == sigma.dtype == np.float64 and stats.count == 500
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-12)  # ddof=1


def test_fd_to_stats_is_the_frechet_distance_of_the_features_gaussian():
    from ectune.metrics import fd_to_stats
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((300, 6)), rng.standard_normal((200, 6)) + 0.5
    mu, sigma = FeatureStats().update(y).mean_cov()
    assert fd_to_stats(x, mu, sigma) == frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma)
    assert abs(fd_to_stats(y, mu, sigma)) < 1e-9


def test_feature_stats_rejects_mismatched_dimensions_and_too_few_samples():
    stats = FeatureStats().update(np.zeros((3, 4)))
    with pytest.raises(EctuneError, match="dimension"):
        stats.update(np.zeros((3, 5)))
    with pytest.raises(EctuneError, match="at least 2"):
        FeatureStats().update(np.zeros((1, 4))).mean_cov()


# --- KID
def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    same_mean, same_std = kid(a, b, num_subsets=20, subset_size=500)
    shifted_mean, _ = kid(a, b + 0.5, num_subsets=20, subset_size=500)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 0.05 and shifted_mean > 20 * abs(same_mean)


def test_kid_of_two_points_matches_hand_computation():
    """Subsets of size 2 hold every row, so the unbiased MMD² is exact: k(a,b) = (a·b/D + 1)³."""
    x, y = np.array([[1.0], [0.0]]), np.array([[2.0], [-1.0]])
    k = lambda a, b: (a * b + 1.0) ** 3  # noqa: E731
    expected = 2 * k(1, 0) / 2 + 2 * k(2, -1) / 2 - 2 * (k(1, 2) + k(1, -1) + k(0, 2) + k(0, -1)) / 4
    assert kid(x, y, num_subsets=3) == pytest.approx((expected, 0.0))


# --- precision / recall
def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(8).standard_normal((400, 8))
    assert precision_recall(x, x.copy(), k=3, chunk=128) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(9)
    real, fake = rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) + 100
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_sees_a_dropped_mode():
    """Fake covers one of two real clusters: precision stays high, recall drops to at most half."""
    rng = np.random.default_rng(10)
    cluster = lambda shift: rng.standard_normal((200, 4)) + shift  # noqa: E731
    real = np.concatenate([cluster(0), cluster(50)])
    both_p, both_r = precision_recall(real, np.concatenate([cluster(0), cluster(50)]))
    one_p, one_r = precision_recall(real, cluster(0))
    assert both_p > 0.8 and both_r > 0.8
    assert one_p > 0.8 and 0.35 < one_r <= 0.5


def test_precision_recall_with_the_reference_radii_given_equals_computing_them():
    """A reference's radii computed once (Reference.knn_radii) give the same scores; the radius of a point
    is its distance to the k-th nearest other point, by brute force."""
    from ectune.metrics.frechet import knn_radii
    rng = np.random.default_rng(11)
    real, fake = rng.standard_normal((300, 6)), rng.standard_normal((200, 6)) + 0.3
    radii = knn_radii(real, 3, chunk=64)
    brute = np.sort(np.linalg.norm(real[:, None] - real[None], axis=2), axis=1)[:, 3]
    np.testing.assert_allclose(radii.numpy(), brute, rtol=1e-12)
    assert precision_recall(real, fake, real_radii=radii) == precision_recall(real, fake)
    with pytest.raises(EctuneError, match="one radius per real feature"):
        precision_recall(real, fake, real_radii=radii[:-1])


def test_precision_recall_rejects_k_too_large():
    with pytest.raises(EctuneError, match="k must be"):
        precision_recall(np.zeros((3, 2)), np.zeros((5, 2)), k=3)


# --- the shipped classifier
@pytest.fixture(scope="module")
def fmnist_test():
    from ectune.data import load_fashion_mnist

    try:
        return load_fashion_mnist(split="test")
    except EctuneError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")


def test_shipped_classifier_file_is_small_and_documented():
    meta = read_metadata()
    card = json.loads(DEFAULT_PATH.with_suffix(".json").read_text())
    assert DEFAULT_PATH.stat().st_size < 2 * 1024 * 1024
    assert float(meta["test_accuracy"]) >= 0.90 and card["test_accuracy"] == float(meta["test_accuracy"])
    assert card["file_sha256"] == classifier_hash() and card["weights_sha256"] == meta["weights_sha256"]


def test_shipped_classifier_loads_and_gives_features():
    model = load_classifier()
    assert isinstance(model, FMNISTClassifier) and not model.training
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert model.features(x).shape == (5, FEATURE_DIM)
        assert model(x).shape == (5, 10)


def test_shipped_classifier_accuracy_on_first_1000_test_images(fmnist_test):
    model = load_classifier()
    x = fmnist_test.images[:1000].float() / 127.5 - 1
    with torch.no_grad():
        acc = (model(x).argmax(1) == fmnist_test.labels[:1000]).double().mean()
    assert acc >= 0.88


def test_load_classifier_rejects_foreign_or_tampered_files(tmp_path):
    state = load_file(str(DEFAULT_PATH))
    meta = read_metadata()
    save_file(state, tmp_path / "other.safetensors", metadata={**meta, "architecture": "resnet"})
    with pytest.raises(EctuneError, match="architecture"):
        load_classifier(tmp_path / "other.safetensors")
    state["head.bias"] = state["head.bias"] + 1
    save_file(state, tmp_path / "tampered.safetensors", metadata=meta)
    with pytest.raises(EctuneError, match="sha256"):
        load_classifier(tmp_path / "tampered.safetensors")
    with pytest.raises(EctuneError, match="cannot read"):
        load_classifier(tmp_path / "missing.safetensors")


def test_classifier_features_accepts_uint8_and_float_images():
    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    from_tensor = classifier_features(images, batch=3)
    assert from_tensor.shape == (7, FEATURE_DIM) and from_tensor.dtype == np.float64
    np.testing.assert_array_equal(classifier_features(images.numpy(), batch=3), from_tensor)
    np.testing.assert_array_equal(classifier_features(images.float() / 127.5 - 1, batch=3), from_tensor)
    np.testing.assert_allclose(classifier_features(images), from_tensor, rtol=1e-4, atol=1e-5)  # batch size
    with pytest.raises(EctuneError, match=r"\[-1, 1\]"):
        classifier_features(images.float())
    with pytest.raises(EctuneError, match="28, 28"):
        classifier_features(torch.zeros(2, 3, 32, 32))


def test_fd_of_real_test_set_is_zero_against_itself_and_grows_with_noise(fmnist_test, tmp_path):
    """On the first 2000 test images to stay fast; the full split works the same way."""
    images, n = fmnist_test.images[:2000], 2000
    mu, sigma, feats = reference_stats("test", limit=n, cache_dir=tmp_path)
    assert feats.shape == (n, FEATURE_DIM) and len(list(tmp_path.glob("*.npz"))) == 1
    cached = reference_stats("test", limit=n, cache_dir=tmp_path)  # second call reads the cache
    np.testing.assert_array_equal(cached[1], sigma)
    assert abs(fd_against_reference(images, limit=n, cache_dir=tmp_path)) < 1e-6
    noisy = (images.float() / 127.5 - 1 + 0.3 * torch.randn(images.shape)).clamp(-1, 1)
    assert fd_against_reference(noisy, limit=n, cache_dir=tmp_path) > 50.0  # real-vs-real floor is ~0.7


def test_reference_stats_cache_is_keyed_by_feature_version_and_survives_corruption(fmnist_test, tmp_path, monkeypatch):
    import ectune.metrics.reference as reference

    mu, sigma, _ = reference_stats("test", limit=200, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.npz")
    cache_file.write_bytes(b"not an npz")  # unreadable cache → recomputed and rewritten
    np.testing.assert_array_equal(reference_stats("test", limit=200, cache_dir=tmp_path)[0], mu)
    monkeypatch.setattr(reference, "FEATURES_VERSION", "another-feature-definition")
    reference_stats("test", limit=200, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_training_augmentation_flips_and_shifts_within_bounds():
    from ectune.metrics.classifier import _augment

    x = torch.rand(16, 1, 28, 28) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    y = _augment(x, gen, shift=2)
    assert y.shape == x.shape
    for xi, yi in zip(x, y):  # each output is a ±2 px shift of the image or of its mirror, padded with -1
        candidates = [
            torch.nn.functional.pad(src, (2, 2, 2, 2), value=-1.0)[:, dy : dy + 28, dx : dx + 28]
            for src in (xi, xi.flip(-1)) for dy in range(5) for dx in range(5)
        ]
        assert any(torch.equal(yi, c) for c in candidates)
