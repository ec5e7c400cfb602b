"""Distances between two sets of features: Fréchet distance, KID, k-NN precision / recall.

Pure formula functions on feature arrays, plus `FeatureStats`, an accumulator of the sums that
the Fréchet distance needs, added up batch by batch. (Evaluation under torchrun gathers the samples
to rank 0 instead of reducing these sums: KID and precision/recall need every feature, and scores
computed on one process are the same whatever the number of processes.)
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

from ectune.errors import EctuneError

_IMAG_TOL = 1e-3  # largest |imaginary part| of sqrtm(Σ1 Σ2), relative to its largest |entry|, taken as noise


# --- Fréchet distance
def _as_features(x, name: str) -> np.ndarray:
    """numpy or torch (N, D) → float64 numpy (N, D), finite, N ≥ 1."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise EctuneError(f"{name} must be a non-empty (N, D) feature array, got shape {x.shape}; stack the features")
    if not np.isfinite(x).all():
        raise EctuneError(f"{name} holds NaN or inf; the features (or the images behind them) are broken")
    return x


def _sqrtm(a: np.ndarray) -> np.ndarray | None:
    """scipy's matrix square root of a (D, D), or None if scipy finds it singular or non-finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            root = scipy.linalg.sqrtm(a)
        except scipy.linalg.LinAlgWarning:
            return None
    return root if np.isfinite(root).all() else None


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, the FID formula).

    d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}); mu (D,), sigma (D, D). If Σ1 Σ2 is singular
    (e.g. a feature that is always 0), eps·I is added to both covariances and the distance of these
    regularised Gaussians is returned (in every term, unlike pytorch-fid whose traces then miss 2·eps·D).
    Tiny imaginary parts of the root are dropped; large ones raise EctuneError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise EctuneError(
            f"frechet_distance needs mu (D,) and sigma (D, D) of one D, got {mu1.shape}, {s1.shape}, "
            f"{mu2.shape}, {s2.shape}; compute both statistics with the same feature extractor"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise EctuneError("frechet_distance got NaN or inf statistics; check the features they came from")
    covmean = _sqrtm(s1 @ s2)
    if covmean is None:  # regularise both Gaussians, traces included, so identical stats still give 0
        s1, s2 = s1 + eps * np.eye(d), s2 + eps * np.eye(d)
        covmean = _sqrtm(s1 @ s2)
        if covmean is None:
            raise EctuneError("Σ1 Σ2 has no usable square root even with eps·I added; use more samples")
    if np.iscomplexobj(covmean):
        scale = max(float(np.abs(covmean).max()), 1e-30)
        if np.abs(covmean.imag).max() > _IMAG_TOL * scale:
            raise EctuneError(
                f"sqrtm(Σ1 Σ2) has imaginary parts up to {np.abs(covmean.imag).max():.3g}: the covariances are "
                "numerically broken (too few samples for the feature dimension?); use more samples"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fd_to_stats(feats, mu, sigma) -> float:
    """Fréchet distance between the Gaussian of features (N, D) (their mean and unbiased covariance)
    and N(mu, sigma): how samples are scored against cached reference statistics."""
    f = _as_features(feats, "feats")
    return frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu, sigma)


class FeatureStats:
    """Running sums for mean and covariance of features (D,): Σx (D,), Σxxᵀ (D, D), count, in float64.

    `mean_cov` uses the unbiased covariance (ddof=1), as np.cov(feats, rowvar=False) in standard FID.
    """

    def __init__(self, dim: int | None = None) -> None:
        self.dim, self.count, self.sum, self.outer = None, 0, None, None
        if dim is not None:
            self._allocate(dim)

    def _allocate(self, dim: int) -> None:
        self.dim, self.sum, self.outer = dim, np.zeros(dim), np.zeros((dim, dim))

    def update(self, feats) -> FeatureStats:
        """Add a batch of features (N, D) (numpy or torch); returns self."""
        x = _as_features(feats, "features")
        if self.dim is None:
            self._allocate(x.shape[1])
        if x.shape[1] != self.dim:
            raise EctuneError(
                f"features have dimension {x.shape[1]}, this FeatureStats holds {self.dim}; use one extractor"
            )
        self.count += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) in float64; sigma = (Σxxᵀ − n μμᵀ) / (n − 1)."""
        if self.count < 2:
            raise EctuneError(f"FeatureStats holds {self.count} samples; a covariance needs at least 2")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2


# --- kernel inception distance
def _cubed(a: np.ndarray) -> np.ndarray:
    """a³ by two products (numpy's ** 3 goes through pow(): 7× slower on a 1000² kernel)."""
    return a * a * a


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of samples x (m, D), y (n, D) with kernel k(a, b) = (a·b / D + 1)³ (Bińkowski et al. 2018)."""
    d = x.shape[1]
    k_xx, k_yy, k_xy = (_cubed(a @ b.T / d + 1.0) for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    t_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    t_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(t_xx + t_yy - 2.0 * k_xy.mean())


def kid(feats1, feats2, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance: (mean, std) of the unbiased MMD² over random subsets.

    feats (N1, D), (N2, D); each of `num_subsets` rounds draws min(subset_size, N1, N2) rows of each
    set without replacement (numpy Generator seeded by `seed`); std is the population std (ddof=0).
    """
    x, y = _as_features(feats1, "feats1"), _as_features(feats2, "feats2")
    if x.shape[1] != y.shape[1]:
        raise EctuneError(f"KID needs features of one dimension, got {x.shape[1]} and {y.shape[1]}")
    m = min(subset_size, len(x), len(y))
    if m < 2 or num_subsets < 1:
        raise EctuneError(
            f"KID needs subsets of ≥ 2 samples and ≥ 1 subset, got {m} and {num_subsets}; pass more features"
        )
    rng = np.random.default_rng(seed)
    scores = [
        _mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(scores)), float(np.std(scores))


# --- precision / recall
def knn_radii(feats, k: int = 3, chunk: int = 1000) -> torch.Tensor:
    """Distance of each row of feats (N, D) to its k-th nearest other row: (N,) float64, the radii of
    the set's manifold in precision_recall (a reference's radii can be computed once: `real_radii`)."""
    return _knn_radii(torch.from_numpy(_as_features(feats, "feats")), k, chunk)


def _knn_radii(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """knn_radii of features already checked and in float64."""
    radii = []
    for i in range(0, len(feats), chunk):
        dist = torch.cdist(feats[i : i + chunk], feats)  # (c, N), includes the zero self-distance
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_manifold(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each row of query (M, D): is it within radii[j] of some ref[j]? → bool (M,)."""
    inside = []
    for i in range(0, len(query), chunk):
        dist = torch.cdist(query[i : i + chunk], ref)  # (c, N)
        inside.append((dist <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 1000, *,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019) of fake features against real ones.

    Each set's manifold is the union of balls around its points with radius = distance to the k-th
    nearest neighbour in the same set. precision = share of fake inside the real manifold;
    recall = share of real inside the fake manifold. Distances in float64, `chunk` rows at a time.
    """
    real = torch.from_numpy(_as_features(real_feats, "real_feats"))
    fake = torch.from_numpy(_as_features(fake_feats, "fake_feats"))
    if real.shape[1] != fake.shape[1]:
        raise EctuneError(f"precision_recall needs features of one dimension, got {real.shape[1]} and {fake.shape[1]}")
    if not 1 <= k < min(len(real), len(fake)):
        raise EctuneError(f"k must be in [1, N) for both sets, got k={k} with {len(real)} real and {len(fake)} fake")
    if real_radii is None:
        real_radii = _knn_radii(real, k, chunk)
    elif real_radii.shape != (len(real),):
        raise EctuneError(f"real_radii must hold one radius per real feature ({len(real)}), got shape "
                          f"{tuple(real_radii.shape)}; compute them with knn_radii(real_feats, k)")
    precision = _inside_manifold(fake, real, real_radii, chunk).double().mean()
    recall = _inside_manifold(real, fake, _knn_radii(fake, k, chunk), chunk).double().mean()
    return float(precision), float(recall)
