"""`ectune eval`: sample a checkpoint on fixed seeds and score it, with everything that makes the
number reproducible written beside it (feature network hash, reference statistics hash, seeds, sampler).

Metrics are computed in the features of ectune's shipped Fashion-MNIST classifier against the
Fashion-MNIST test split: Fréchet distance (FD), KID and k-NN precision/recall; or, with
`--metric inception`, the standard Inception FID against any dataset (metrics/inception.py).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from . import __version__
from .checkpoint import resolve_weights
from .images import to_uint8


def reference():
    """(mu, sigma, feats, stats_sha256) of the Fashion-MNIST test split in classifier features."""
    from .metrics import reference_stats
    mu, sigma, feats = reference_stats("test")
    digest = hashlib.sha256(np.ascontiguousarray(mu).tobytes() + np.ascontiguousarray(sigma).tobytes()).hexdigest()
    return mu, sigma, feats, digest


def score_samples(x, ref) -> dict:
    """FD, KID and precision/recall of samples x ((N, 1, 28, 28) in [-1, 1]) against `reference()`."""
    from .metrics import classifier_features, frechet_distance, kid, precision_recall
    mu_r, sigma_r, feats_r, _ = ref
    f = classifier_features(to_uint8(x))
    kid_mean, kid_std = kid(f, feats_r, subset_size=min(1000, len(f)))
    precision, recall = precision_recall(feats_r, f)
    return {"fd": float(frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu_r, sigma_r)),
            "kid": float(kid_mean), "kid_std": float(kid_std),
            "precision": float(precision), "recall": float(recall)}


def fd_only(x, ref) -> float:
    """Classifier FD alone (no KID, no precision/recall): what a search over settings needs."""
    from .metrics import classifier_features, frechet_distance
    f = classifier_features(to_uint8(x))
    return float(frechet_distance(f.mean(0), np.cov(f, rowvar=False), ref[0], ref[1]))


def inception_reference(dataset, *, weights=None, device="cpu", batch: int = 50, progress: bool = False):
    """(mu, sigma, stats_sha256) of `dataset` (ImageDataset or uint8 images) in Inception features, cached."""
    from .metrics.inception import inception_reference_stats
    mu, sigma = inception_reference_stats(dataset, weights=weights, device=device, batch=batch, progress=progress)
    digest = hashlib.sha256(np.ascontiguousarray(mu).tobytes() + np.ascontiguousarray(sigma).tobytes()).hexdigest()
    return mu, sigma, digest


def score_inception(x, ref, *, weights=None, device="cpu", batch: int = 50, progress: bool = False) -> dict:
    """Inception FID of samples x ((N, C, H, W) in [-1, 1]) against `inception_reference(...)`."""
    from .metrics.inception import fid
    return {"fid": float(fid(to_uint8(x), (ref[0], ref[1]), weights=weights, device=device, batch=batch,
                             progress=progress))}


def inception_provenance(reference_name: str, weights=None) -> dict:
    """The `features` entries of `provenance` for Inception FID: network name, file and sha256."""
    from .metrics.inception import FEATURES_VERSION, NETWORK_NAME, STANDARD_SHA256, find_weights, network_sha256
    sha = network_sha256(weights)
    return {"metric": "inception-fid", "metric_features": NETWORK_NAME, "feature_preprocessing": FEATURES_VERSION,
            "feature_network_file": str(find_weights(weights)), "feature_network_sha256": sha,
            "feature_network_is_standard": sha == STANDARD_SHA256, "reference": reference_name}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(ckpt, sampler: dict, seeds: list[int], ref_digest: str, weights: str,
               features: dict | None = None) -> dict:
    """What makes a result reproducible; `features` describes the metric (default: the classifier's)."""
    from .metrics import classifier_hash
    if features is None:
        features = {"metric": "classifier", "metric_features": "ectune fmnist-classifier (penultimate, 128-d)",
                    "feature_network_sha256": classifier_hash(), "reference": "fashion-mnist test (10k)"}
    return {**features, "reference_stats_sha256": ref_digest, "num_samples": len(seeds),
            "seeds": [seeds[0], seeds[-1] + 1], "sampler": sampler,
            "checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(resolve_weights(ckpt)),
            "weights": weights, "ectune_version": __version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
