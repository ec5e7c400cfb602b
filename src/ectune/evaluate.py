"""`ectune eval`: sample a checkpoint on fixed seeds and score it, with everything that makes the
number reproducible written beside it (feature network hash, reference statistics hash, seeds, sampler).

Metrics are computed in the features of ectune's shipped Fashion-MNIST classifier against the
Fashion-MNIST test split: Fréchet distance (FD), KID and k-NN precision/recall; or, with
`--metric inception`, the standard Inception FID against any dataset (metrics/inception.py).
The classifier metric only fits Fashion-MNIST: `classifier_reference_spec` refuses it for a run on
other data (or --ref-data of other data); every result names its reference and its size.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__, distributed
from .checkpoint import resolve_weights
from .errors import EctuneError
from .images import to_uint8


def reference():
    """(mu, sigma, feats, stats_sha256) of the Fashion-MNIST test split in classifier features."""
    from .metrics import reference_stats
    mu, sigma, feats = reference_stats("test")
    return mu, sigma, feats, _digest(mu, sigma)


def _digest(mu, sigma) -> str:
    return hashlib.sha256(np.ascontiguousarray(mu).tobytes() + np.ascontiguousarray(sigma).tobytes()).hexdigest()


def is_fashion_mnist(spec: str) -> bool:
    """Whether a dataset spec names Fashion-MNIST (or a [classes=...] subset of it): 'fashion-mnist',
    'fmnist', 'fashion-mnist:DIR' or a folder of its IDX files."""
    from .data import split_class_subset
    from .data.fmnist import _has_fmnist_files
    base, _ = split_class_subset(spec.strip())
    if base.partition(":")[0].lower() in ("fashion-mnist", "fmnist"):
        return True
    path = Path(base).expanduser()
    return bool(base) and path.is_dir() and _has_fmnist_files(path)


def classifier_reference_spec(run_data: str, ref_data: str | None, ckpt) -> tuple[str, str | None]:
    """(dataset spec, note or None) the classifier metric scores against; refused where it does not fit.

    The classifier metric measures in the features of a Fashion-MNIST classifier, against Fashion-MNIST's
    test split: --ref-data must name Fashion-MNIST; without it a run on Fashion-MNIST is scored against
    the test split of the same classes, a model that records no data (diffusers, imported) against all
    of it, with a note; a run on other data is refused."""
    fix = "use --metric inception --ref-data DATA to score against other data"
    if ref_data is not None:
        if not is_fashion_mnist(ref_data):
            raise EctuneError(f"--ref-data {ref_data} is not Fashion-MNIST, and the classifier metric only scores "
                              f"against Fashion-MNIST; {fix}")
        return ref_data, None
    if not run_data.strip():
        return "fashion-mnist", (f"--ckpt {ckpt} records no training data; scoring against the Fashion-MNIST test "
                                 "split (pass --ref-data fashion-mnist to confirm, or --metric inception for other data)")
    if not is_fashion_mnist(run_data):
        raise EctuneError(f"--ckpt {ckpt} was trained on {run_data}, not Fashion-MNIST, so the classifier metric "
                          f"(against Fashion-MNIST) does not fit it; {fix}, or pass --ref-data fashion-mnist "
                          "to score against Fashion-MNIST anyway")
    from .data import split_class_subset
    _, classes = split_class_subset(run_data.strip())       # the same classes, from wherever it is installed here
    return "fashion-mnist" + (f"[classes={','.join(map(str, classes))}]" if classes else ""), None


def classifier_reference(spec: str = "fashion-mnist"):
    """((mu, sigma, feats, stats_sha256), description) of the test split of Fashion-MNIST `spec`
    in classifier features; description: {"reference": "SPEC (NAME, N images)", "reference_images": N}."""
    from .data import load_dataset
    from .metrics import images_stats
    ds = load_dataset(spec, split="test")
    if tuple(ds.images.shape[1:]) != (1, 28, 28):
        raise EctuneError(f"--ref-data {spec} holds {tuple(ds.images.shape[1:])} images, not Fashion-MNIST's "
                          "(1, 28, 28); use --metric inception for other data")
    mu, sigma, feats = images_stats(ds.images, ds.name)
    return (mu, sigma, feats, _digest(mu, sigma)), {"reference": f"{spec} ({ds.name}, {len(ds)} images)",
                                                    "reference_images": len(ds)}


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


def classifier_reference_for(run_data: str, ref_data: str | None, ckpt):
    """(ref, provenance features) of `eval --metric classifier`: the reference `classifier_reference_spec`
    picks (its note, if any, on stderr), in classifier features."""
    spec, note = classifier_reference_spec(run_data, ref_data, ckpt)
    if note and distributed.is_main():
        print(f"ectune: note: {note}", file=sys.stderr)
    ref, description = classifier_reference(spec)
    return ref, classifier_provenance(description)


def classifier_provenance(description: dict) -> dict:
    """The `features` entries of `provenance` for the classifier metric; `description` names the reference."""
    from .metrics import classifier_hash
    return {"metric": "classifier", "metric_features": "ectune fmnist-classifier (penultimate, 128-d)",
            "feature_network_sha256": classifier_hash(), **description}


def inception_reference(dataset, *, weights=None, device="cpu", batch: int = 50, progress: bool = False):
    """(mu, sigma, stats_sha256) of `dataset` (ImageDataset or uint8 images) in Inception features, cached."""
    from .metrics.inception import inception_reference_stats
    mu, sigma = inception_reference_stats(dataset, weights=weights, device=device, batch=batch, progress=progress)
    return mu, sigma, _digest(mu, sigma)


def score_inception(x, ref, *, weights=None, device="cpu", batch: int = 50, progress: bool = False) -> dict:
    """Inception FID of samples x ((N, C, H, W) in [-1, 1]) against `inception_reference(...)`."""
    from .metrics.inception import fid
    return {"fid": float(fid(to_uint8(x), (ref[0], ref[1]), weights=weights, device=device, batch=batch,
                             progress=progress))}


def inception_provenance(reference_name: str, weights=None, reference_images: int | None = None) -> dict:
    """The `features` entries of `provenance` for Inception FID: network name, file and sha256."""
    from .metrics.inception import FEATURES_VERSION, NETWORK_NAME, STANDARD_SHA256, find_weights, network_sha256
    sha = network_sha256(weights)
    return {"metric": "inception-fid", "metric_features": NETWORK_NAME, "feature_preprocessing": FEATURES_VERSION,
            "feature_network_file": str(find_weights(weights)), "feature_network_sha256": sha,
            "feature_network_is_standard": sha == STANDARD_SHA256, "reference": reference_name,
            "reference_images": reference_images}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(ckpt, sampler: dict, seeds: list[int], ref_digest: str, weights: str,
               features: dict | None = None) -> dict:
    """What makes a result reproducible; `features` describes the metric (default: the classifier's)."""
    if features is None:
        features = classifier_provenance({"reference": "fashion-mnist (fashion-mnist-test, 10000 images)",
                                          "reference_images": 10000})
    return {**features, "reference_stats_sha256": ref_digest, "num_samples": len(seeds),
            "seeds": [seeds[0], seeds[-1] + 1], "sampler": sampler,
            "checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(resolve_weights(ckpt)),
            "weights": weights, "ectune_version": __version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
