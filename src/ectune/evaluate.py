"""`ectune eval`: sample a checkpoint on fixed seeds and score it, with everything that makes the
number reproducible written beside it (feature network hash, reference statistics hash, seeds, sampler).

Metrics are computed in the features of ectune's shipped Fashion-MNIST classifier against the
Fashion-MNIST test split: Fréchet distance (FD), KID and k-NN precision/recall.
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


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(ckpt, sampler: dict, seeds: list[int], ref_digest: str, weights: str) -> dict:
    from .metrics import classifier_hash
    return {"metric_features": "ectune fmnist-classifier (penultimate, 128-d)",
            "feature_network_sha256": classifier_hash(), "reference": "fashion-mnist test (10k)",
            "reference_stats_sha256": ref_digest, "num_samples": len(seeds),
            "seeds": [seeds[0], seeds[-1] + 1], "sampler": sampler,
            "checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(resolve_weights(ckpt)),
            "weights": weights, "ectune_version": __version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
