"""Fashion-MNIST images → classifier features → statistics, with real-data statistics cached on disk.

Real statistics are cached under ~/.cache/ectune/stats/<key>.npz, where key = sha256 of the
feature version, the sha256 of the classifier file and the sha256 of the image bytes, so a change
to the feature code, the weights or the data recomputes them.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch

from ectune.atomic import atomic_file
from ectune.errors import EctuneError
from ectune.images import from_uint8
from ectune.metrics.classifier import FEATURES_VERSION, FMNISTClassifier, classifier_hash, load_classifier
from ectune.metrics.frechet import FeatureStats, fd_to_stats, frechet_distance

_MAX_ABS = 2.0  # float images beyond ±2 are on another scale (e.g. [0, 255]), not [-1, 1]


@functools.lru_cache(maxsize=4)
def _cached_classifier(path: str | None) -> FMNISTClassifier:
    return load_classifier(path)


def _to_unit_range(images) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) or float in [-1, 1] (numpy or torch) → float32 (N, 1, 28, 28) in [-1, 1].

    Float images are quantised to uint8 exactly as ectune saves samples (x·127.5 + 128, clamped to
    [0, 255], truncated), so in-memory samples and their saved PNG/npz files give the same features.
    """
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28) or len(x) == 0:
        raise EctuneError(f"images must be (N, 1, 28, 28), got {tuple(x.shape)}; pass Fashion-MNIST-shaped samples")
    if x.is_floating_point():
        if not torch.isfinite(x).all():
            raise EctuneError("images hold NaN or inf; the generator diverged, fix it before measuring")
        if x.abs().max() > _MAX_ABS:
            raise EctuneError(f"float images must lie in [-1, 1], got range [{x.min():.3g}, {x.max():.3g}]; "
                              "rescale them (x / 127.5 - 1 for [0, 255]) or pass uint8")
        x = (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise EctuneError(f"images must be uint8 or float in [-1, 1], got {x.dtype}; convert them")
    return from_uint8(x)


@torch.no_grad()
def classifier_features(images, classifier: FMNISTClassifier | None = None, batch: int = 500) -> np.ndarray:
    """Penultimate features float64 (N, D) of images uint8 (N, 1, 28, 28) or float in [-1, 1].

    classifier None uses the shipped weights (`load_classifier()`); it must be in eval mode.
    """
    model = _cached_classifier(None) if classifier is None else classifier
    if batch < 1:
        raise EctuneError(f"batch must be >= 1, got {batch}")
    if model.training:
        raise EctuneError("the classifier is in training mode (BatchNorm/dropout active); call .eval() first")
    x = _to_unit_range(images)
    device = next(model.parameters()).device
    feats = [model.features(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)]
    return torch.cat(feats).double().numpy()


def _stats_of(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return FeatureStats().update(feats).mean_cov()


def default_stats_dir() -> Path:
    """~/.cache/ectune/stats: where `reference_stats` keeps real-data statistics."""
    return Path.home() / ".cache" / "ectune" / "stats"


def _save_npz(path: Path, **arrays) -> None:
    """Write an .npz atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def _read_cache(path: Path, clf_hash: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(mu, sigma, feats float64) from a cache file, or None if it is missing, unreadable or stale."""
    try:
        with np.load(path) as z:
            if str(z["features_version"]) != FEATURES_VERSION or str(z["classifier_sha256"]) != clf_hash:
                return None
            return z["mu"], z["sigma"], z["feats"].astype(np.float64)
    except (OSError, KeyError, ValueError, EOFError):
        return None


def reference_stats(split: str = "test", limit: int | None = None, classifier_path: str | Path | None = None,
                    cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D), feats (N, D)) of the real Fashion-MNIST `split` (first `limit` images), float64.

    Computed once per (feature version, classifier file, image bytes) and cached as <cache_dir>/<key>.npz;
    a missing, unreadable or stale cache file is recomputed and overwritten.
    """
    from ectune.data import load_fashion_mnist

    images = load_fashion_mnist(split=split).images[:limit]
    return images_stats(images, split, classifier_path=classifier_path, cache_dir=cache_dir)


def images_stats(images, name: str = "", classifier_path: str | Path | None = None,
                 cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, sigma, feats) float64 of real uint8 images (N, 1, 28, 28) (e.g. a class subset of a
    Fashion-MNIST split, `name` recorded in the cache file), cached as `reference_stats` is."""
    images = torch.as_tensor(images)
    data_hash = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    clf_hash = classifier_hash(classifier_path)
    key = hashlib.sha256(f"{FEATURES_VERSION}|{clf_hash}|{data_hash}".encode()).hexdigest()
    path = Path(cache_dir or default_stats_dir()) / f"{key}.npz"
    cached = _read_cache(path, clf_hash)
    if cached is not None:
        return cached
    path_arg = None if classifier_path is None else str(Path(classifier_path).resolve())
    feats = classifier_features(images, _cached_classifier(path_arg))
    mu, sigma = _stats_of(feats)
    _save_npz(path, mu=mu, sigma=sigma, feats=feats.astype(np.float32), split=np.array(name),
              features_version=np.array(FEATURES_VERSION), classifier_sha256=np.array(clf_hash),
              dataset_sha256=np.array(data_hash))
    return mu, sigma, feats  # features are float32 values, so the float32 cache is lossless


def fd_against_reference(fake_images, split: str = "test", limit: int | None = None,
                         classifier_path: str | Path | None = None, cache_dir: str | Path | None = None) -> float:
    """Fréchet distance in classifier features between fake_images (N, 1, 28, 28) and real `split`
    (its first `limit` images; all by default).

    FD is biased upwards for small N; compare numbers only at equal N (10k is the convention).
    """
    path_arg = None if classifier_path is None else str(Path(classifier_path).resolve())
    mu_r, sigma_r, _ = reference_stats(split, limit, classifier_path=classifier_path, cache_dir=cache_dir)
    return fd_to_stats(classifier_features(fake_images, _cached_classifier(path_arg)), mu_r, sigma_r)


def real_vs_real_floor(n: int = 10_000, classifier_path: str | Path | None = None,
                       cache_dir: str | Path | None = None) -> float:
    """FD between the first n Fashion-MNIST train images and the test split: the best FD to hope for."""
    mu_a, sigma_a, _ = reference_stats("train", limit=n, classifier_path=classifier_path, cache_dir=cache_dir)
    mu_b, sigma_b, _ = reference_stats("test", classifier_path=classifier_path, cache_dir=cache_dir)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
