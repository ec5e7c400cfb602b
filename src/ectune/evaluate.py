"""`ectune eval`: sample a checkpoint on fixed seeds and score it, with everything that makes the
number reproducible written beside it (feature network hash, reference statistics hash, seeds, sampler).

Metrics are computed in the features of ectune's shipped Fashion-MNIST classifier against the
Fashion-MNIST test split: Fréchet distance (FD), KID and k-NN precision/recall; or, with
`--metric inception`, the standard Inception FID against any dataset (metrics/inception.py).
The classifier metric only fits Fashion-MNIST: `classifier_reference_spec` refuses it for a run on
other data (or --ref-data of other data); every result names its reference and its size.

    result = evaluate_checkpoint("runs/ect", 10000, steps=2)     # result.record: the JSON of `ectune eval`
"""

from __future__ import annotations

import functools
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, distributed
from .checkpoint import resolve_weights
from .errors import EctuneError
from .generation import choose_sampler, class_labels, sample_sharded
from .hashing import file_sha256
from .images import to_uint8

@dataclass(frozen=True, eq=False)
class Reference:
    """Feature statistics of the real images that samples are scored against, and where they come from."""
    mu: np.ndarray                      # (D,) mean feature
    sigma: np.ndarray                   # (D, D) feature covariance
    feats: np.ndarray | None            # (N, D) the features (the classifier metric's KID and precision/recall)
    provenance: dict                    # a result's metric entries: feature network, reference name and size

    @functools.cached_property
    def knn_radii(self):
        """The real manifold's radii for precision/recall (k = 3), computed once per reference."""
        from .metrics.frechet import knn_radii
        return knn_radii(self.feats)

    @property
    def sha256(self) -> str:
        """Identifies the statistics (recorded as reference_stats_sha256)."""
        return hashlib.sha256(np.ascontiguousarray(self.mu).tobytes() +
                              np.ascontiguousarray(self.sigma).tobytes()).hexdigest()


# --- references
def reference() -> Reference:
    """The Fashion-MNIST test split in classifier features."""
    from .metrics import reference_stats
    mu, sigma, feats = reference_stats("test")
    return Reference(mu, sigma, feats, classifier_provenance(
        {"reference": "fashion-mnist (fashion-mnist-test, 10000 images)", "reference_images": 10000}))


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


def classifier_reference(spec: str = "fashion-mnist") -> Reference:
    """The test split of Fashion-MNIST `spec` in classifier features."""
    from .data import load_dataset
    from .metrics import images_stats
    ds = load_dataset(spec, split="test")
    if tuple(ds.images.shape[1:]) != (1, 28, 28):
        raise EctuneError(f"--ref-data {spec} holds {tuple(ds.images.shape[1:])} images, not Fashion-MNIST's "
                          "(1, 28, 28); use --metric inception for other data")
    mu, sigma, feats = images_stats(ds.images, ds.name)
    return Reference(mu, sigma, feats, classifier_provenance({"reference": f"{spec} ({ds.name}, {len(ds)} images)",
                                                              "reference_images": len(ds)}))


def classifier_provenance(description: dict) -> dict:
    """The metric entries of a classifier result; `description` names the reference and its size."""
    from .metrics import classifier_hash
    return {"metric": "classifier", "metric_features": "ectune fmnist-classifier (penultimate, 128-d)",
            "feature_network_sha256": classifier_hash(), **description}


def inception_reference(dataset, *, weights=None, device="cpu", batch: int = 50, progress: bool | str = False,
                        name: str | None = None) -> Reference:
    """`dataset` (ImageDataset or uint8 images) in Inception features, statistics cached; `name`
    describes it in the provenance (default: the dataset's name)."""
    from .metrics.inception import inception_reference_stats
    mu, sigma = inception_reference_stats(dataset, weights=weights, device=device, batch=batch, progress=progress)
    images = getattr(dataset, "images", dataset)
    return Reference(mu, sigma, None, inception_provenance(name or getattr(dataset, "name", ""), weights, len(images)))


def inception_provenance(reference_name: str, weights=None, reference_images: int | None = None) -> dict:
    """The metric entries of an Inception FID result: network name, file and sha256, and the reference."""
    from .metrics.inception import FEATURES_VERSION, NETWORK_NAME, STANDARD_SHA256, find_weights, network_sha256
    sha = network_sha256(weights)
    return {"metric": "inception-fid", "metric_features": NETWORK_NAME, "feature_preprocessing": FEATURES_VERSION,
            "feature_network_file": str(find_weights(weights)), "feature_network_sha256": sha,
            "feature_network_is_standard": sha == STANDARD_SHA256, "reference": reference_name,
            "reference_images": reference_images}


# --- scores
def score_samples(x, ref: Reference) -> dict:
    """FD, KID and precision/recall of samples x ((N, 1, 28, 28) in [-1, 1]) in classifier features."""
    from .metrics import classifier_features, fd_to_stats, kid, precision_recall
    f = classifier_features(to_uint8(x))
    kid_mean, kid_std = kid(f, ref.feats, subset_size=min(1000, len(f)))
    precision, recall = precision_recall(ref.feats, f, real_radii=ref.knn_radii)
    return {"fd": fd_to_stats(f, ref.mu, ref.sigma), "kid": float(kid_mean), "kid_std": float(kid_std),
            "precision": float(precision), "recall": float(recall)}


def fd_only(x, ref: Reference) -> float:
    """Classifier FD alone (no KID, no precision/recall): what a search over settings needs."""
    from .metrics import classifier_features, fd_to_stats
    return fd_to_stats(classifier_features(to_uint8(x)), ref.mu, ref.sigma)


def score_inception(x, ref: Reference, *, weights=None, device="cpu", batch: int = 50,
                    progress: bool | str = False) -> dict:
    """Inception FID of samples x ((N, C, H, W) in [-1, 1]) against `ref`."""
    from .metrics.inception import fid
    return {"fid": float(fid(to_uint8(x), (ref.mu, ref.sigma), weights=weights, device=device, batch=batch,
                             progress=progress))}


@dataclass(frozen=True)
class ClassifierMetric:
    """FD, KID and precision/recall in ectune's Fashion-MNIST classifier, against Fashion-MNIST."""
    name = "classifier"

    def reference(self, cfg, ckpt, ref_data: str | None = None) -> Reference:
        """The reference `classifier_reference_spec` picks (its note, if any, on stderr)."""
        if cfg.net.image_shape != (1, 28, 28):
            raise EctuneError("the classifier metric measures Fashion-MNIST-shaped models (1x28x28); "
                              "use --metric inception for other data")
        spec, note = classifier_reference_spec(cfg.data, ref_data, ckpt)
        if note and distributed.is_main():
            print(f"ectune: note: {note}", file=sys.stderr)
        return classifier_reference(spec)

    def score(self, x, ref: Reference) -> dict:
        return score_samples(x, ref)

    def distance(self, x, ref: Reference) -> float:
        return fd_only(x, ref)

    def summary(self, result: dict) -> str:
        return (f"FD {result['fd']:.3f}  KID {result['kid']:.3f}  precision {result['precision']:.3f}  "
                f"recall {result['recall']:.3f}")


@dataclass(frozen=True)
class InceptionMetric:
    """Inception FID against any dataset (--ref-data, default the run's data, its test split)."""
    weights: str | None = None          # the TorchScript network file (default: `inception.find_weights`)
    device: object = "cpu"
    progress: bool | str = False        # the feature passes: a bar, "lines" or nothing
    name = "inception"

    def reference(self, cfg, ckpt, ref_data: str | None = None) -> Reference:
        from .data import load_dataset
        spec = ref_data or cfg.data
        if not spec.strip():
            raise EctuneError(f"--ckpt {ckpt} records no training data; pass --ref-data DATA (e.g. cifar10, "
                              "fashion-mnist or a folder of images) to score it against")
        ds = load_dataset(spec, split="test")
        return inception_reference(ds, weights=self.weights, device=self.device, progress=self.progress,
                                   name=f"{spec} ({ds.name}, {len(ds)} images)")

    def score(self, x, ref: Reference) -> dict:
        return score_inception(x, ref, weights=self.weights, device=self.device, progress=self.progress)

    def distance(self, x, ref: Reference) -> float:
        return self.score(x, ref)["fid"]

    def summary(self, result: dict) -> str:
        return f"FID {result['fid']:.3f}"


def metric(name: str, *, inception=None, device="cpu", progress: bool | str = False):
    """The metric `name` ("classifier" or "inception"); the Inception options apply to the latter."""
    if name == "classifier":
        return ClassifierMetric()
    if name == "inception":
        return InceptionMetric(inception, device, progress)
    raise EctuneError(f"unknown metric {name!r}; use classifier or inception (--metric)")


def provenance(ckpt, sampler: dict, seeds: list[int], ref: Reference, weights: str) -> dict:
    """What makes a result reproducible: the metric and reference, seeds, sampler and checkpoint."""
    return {**ref.provenance, "reference_stats_sha256": ref.sha256, "num_samples": len(seeds),
            "seeds": [seeds[0], seeds[-1] + 1], "sampler": sampler,
            "checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(resolve_weights(ckpt)),
            "weights": weights, "ectune_version": __version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --- `ectune eval`
@dataclass
class Evaluation:
    """What `evaluate_checkpoint` found: the result file's record and a one-line summary of it."""
    record: dict
    summary: str


def evaluate_checkpoint(ckpt, n: int, *, metric_name: str = "classifier", seed: int = 0, ref_data: str | None = None,
                        inception=None, search_mid_t: bool = False, search_n: int = 1000, candidates=None,
                        search_gammas=None, weights: str = "ema", batch: int = 500, device="cpu",
                        progress: bool = True, log=None, **flags) -> Evaluation | None:
    """Score `n` samples of `ckpt` on seeds seed, seed + 1, … (`flags` choose the sampler, see
    `generation.choose_sampler`); with `search_mid_t`, first search the consistency mid times on held-out
    seeds and store the best with the checkpoint (`midtime.search_and_store`; `log` gets a line); with
    `search_gammas` too, 2-step mid time and re-noising γ together, and evaluate at the γ found.
    Under torchrun every rank samples its share and rank 0 scores: None on the others."""
    from .models import load_denoiser
    D, cfg = load_denoiser(ckpt, which=weights, device=device)
    seeds = list(range(seed, seed + n))
    labels = class_labels(cfg, seeds, ckpt=ckpt)
    sampler = choose_sampler(cfg, ckpt, **flags)
    if search_gammas is not None:
        if flags.get("gamma") is not None:
            raise EctuneError("--search-gamma chooses γ itself: drop --gamma (or --search-gamma)")
        if sampler.name != "consistency" or sampler.steps != 2 or flags.get("ts"):
            raise EctuneError("--search-gamma searches consistency sampling with --steps 2 (and no --ts)")
        search_mid_t = True
    if search_mid_t and (sampler.name != "consistency" or sampler.steps < 2 or flags.get("ts")):
        raise EctuneError("--search-mid-t searches consistency sampling with --steps 2 or more (and no --ts)")
    scorer = metric(metric_name, inception=inception, device=device, progress=True if progress else "lines")
    ref = scorer.reference(cfg, ckpt, ref_data)
    search = None
    if search_mid_t:
        from .midtime import search_and_store
        search = distributed.on_main(lambda: search_and_store(
            D, cfg, ckpt, lambda x: scorer.distance(x, ref), steps=sampler.steps, eval_seeds=seeds, n=search_n,
            candidates=candidates, batch=batch, device=device, progress=progress, log=log, gamma=sampler.gamma,
            gammas=search_gammas))
        flags["gamma"] = search.get("gamma", flags.get("gamma"))
        sampler = choose_sampler(cfg, ckpt, **flags, mid_ts=search["mid_ts"])
    t0 = time.perf_counter()
    x = sample_sharded(D, seeds, cfg.net.image_shape, sampler, labels, batch=batch, device=device, progress=progress)
    seconds = time.perf_counter() - t0
    if x is None:                               # another torchrun rank: rank 0 scores
        return None
    record = {**scorer.score(x, ref), "seconds_per_image": seconds / n,
              **provenance(ckpt, sampler.spec, seeds, ref, weights)}
    if search:
        record["mid_t_search"] = search
    spec = sampler.spec
    return Evaluation(record, f"{scorer.summary(record)}  ({n} samples, {spec['name']}, NFE {spec['nfe']}; "
                              f"vs {record['reference']})")

