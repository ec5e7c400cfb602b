"""Sample-quality metrics: Fréchet distance, KID and k-NN precision / recall in the features of a
small Fashion-MNIST classifier shipped with ectune (see `classifier.py` for how it was trained).

    feats = classifier_features(samples)            # (N, 128) float64
    fd = fd_against_reference(samples)              # vs the cached Fashion-MNIST test split
    score = fid(samples_uint8, dataset)             # Inception FID (inception.py), any dataset

Names are imported from their modules on first use, so `python -m ectune.metrics.classifier`
runs the training script without importing it twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "frechet_distance": "frechet",
    "fd_to_stats": "frechet",
    "kid": "frechet",
    "precision_recall": "frechet",
    "FeatureStats": "frechet",
    "FMNISTClassifier": "classifier",
    "load_classifier": "classifier",
    "classifier_hash": "classifier",
    "train_classifier": "classifier",
    "classifier_features": "reference",
    "reference_stats": "reference",
    "images_stats": "reference",
    "fd_against_reference": "reference",
    "real_vs_real_floor": "reference",
    "inception_features": "inception",
    "inception_reference_stats": "inception",
    "fid": "inception",
    "fid_from_features": "inception",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ectune.metrics.classifier import FMNISTClassifier, classifier_hash, load_classifier, train_classifier
    from ectune.metrics.frechet import FeatureStats, fd_to_stats, frechet_distance, kid, precision_recall
    from ectune.metrics.inception import fid, fid_from_features, inception_features, inception_reference_stats
    from ectune.metrics.reference import (
        classifier_features, fd_against_reference, images_stats, real_vs_real_floor, reference_stats,
    )


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ectune.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ectune.metrics.{_EXPORTS[name]}"), name)
