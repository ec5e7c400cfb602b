"""Datasets held in memory as uint8 (N, C, H, W) tensors, and a resumable infinite batch sampler.

Sources: Fashion-MNIST IDX files, CIFAR-10's python tarball, a folder or EDM-style ``.zip`` of images,
an ``.npz`` file, scikit-learn's 8x8 digits.
Every bad input raises EctuneError with a one-line message saying what was wrong and what to do.

Modules: `dataset` (ImageDataset), `fmnist` (IDX files, search path, download),
`files` (image folders, .npz, .zip), `cifar` (CIFAR-10 tarball), `sampler` (BatchSampler); this one
holds digits, class subsets and the `load_dataset` dispatch. Patch module attributes where they are
used (e.g. `ectune.data.fmnist.SYSTEM_FMNIST_DIR`), not on this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ectune.data.cifar import CIFAR10_TARBALL, load_cifar10
from ectune.data.dataset import ImageDataset, _dataset
from ectune.data.files import IMAGE_SUFFIXES, load_image_folder, load_npz, load_zip
from ectune.data.fmnist import (
    FMNIST_MD5,
    OFFICIAL_URL,
    SYSTEM_FMNIST_DIR,
    _check_split,
    _has_fmnist_files,
    default_cache_dir,
    download_fashion_mnist,
    fashion_mnist_search_dirs,
    load_fashion_mnist,
    read_idx,
)
from ectune.data.sampler import BatchSampler
from ectune.errors import EctuneError

__all__ = [
    "BatchSampler",
    "CIFAR10_TARBALL",
    "FMNIST_MD5",
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "OFFICIAL_URL",
    "SYSTEM_FMNIST_DIR",
    "default_cache_dir",
    "download_fashion_mnist",
    "fashion_mnist_search_dirs",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folder",
    "load_npz",
    "load_zip",
    "read_idx",
    "select_classes",
    "split_class_subset",
]


# --- digits and dispatch
def load_digits() -> ImageDataset:
    """scikit-learn's 8x8 digits: images uint8 (1797, 1, 8, 8) scaled from 0..16 to 0..255, labels 0..9."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise EctuneError("dataset 'digits' needs scikit-learn, which is not installed: pip install scikit-learn "
                          "(or use another dataset, e.g. fashion-mnist)") from e
    bunch = sklearn_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return _dataset(images[:, None], np.asarray(bunch.target), "digits")


# --- class subsets: "DATA[classes=0,2,4]"
def split_class_subset(spec: str) -> tuple[str, list[int] | None]:
    """"DATA[classes=0,2,4]" → ("DATA", [0, 2, 4]); a spec without that suffix → (spec, None)."""
    base, bracket, inner = spec.rpartition("[")
    if not (bracket and base and inner.startswith("classes=") and inner.endswith("]")):
        return spec, None
    text = inner[len("classes="):-1]
    try:
        classes = sorted({int(c) for c in text.split(",")})
    except ValueError:
        raise EctuneError(f"bad class list {text!r} in {spec!r}; write integers, e.g. {base}[classes=0,2,4]") from None
    return base, classes


def select_classes(ds: ImageDataset, classes: Sequence[int]) -> ImageDataset:
    """The images of `ds` whose label is in `classes`, in their order; labels keep their numbers
    (so a class-conditional teacher still reads them)."""
    if ds.labels is None:
        raise EctuneError(f"dataset {ds.name!r} has no labels, so [classes=...] cannot select from it; "
                          "use labelled data or drop the [classes=...] suffix")
    present = sorted(set(torch.unique(ds.labels).tolist()))
    missing = sorted(set(classes) - set(present))
    if missing:
        listed = ",".join(map(str, present[:20])) + (",..." if len(present) > 20 else "")
        raise EctuneError(f"dataset {ds.name!r} has no class {missing}; it has classes {listed}")
    keep = torch.isin(ds.labels, torch.tensor(sorted(set(classes)), dtype=torch.int64))
    name = f"{ds.name}[classes={','.join(map(str, sorted(set(classes))))}]"
    return ImageDataset(ds.images[keep], ds.labels[keep], name)


def load_dataset(spec: str, split: str = "train") -> ImageDataset:
    """Load a dataset named by spec; `split` applies to Fashion-MNIST and CIFAR-10 (others have one).

    spec: "fashion-mnist" / "fmnist" (searched), "fashion-mnist:DIR", "cifar10[:TARBALL_OR_DIR]", a
    folder holding Fashion-MNIST IDX files, a path ending in .npz or .zip (EDM-style), an image folder,
    or "digits" (needs scikit-learn); any of them followed by "[classes=0,2,4]" keeps only the images
    of those classes (see `select_classes`).
    """
    _check_split(split)
    base, classes = split_class_subset(spec)
    if classes is not None:
        return select_classes(load_dataset(base, split), classes)
    name, _, rest = spec.partition(":")
    if name.lower() in ("fashion-mnist", "fmnist"):
        return load_fashion_mnist(rest or None, split)
    if name.lower() in ("cifar10", "cifar-10"):
        return load_cifar10(rest or None, split)
    if not spec.strip():
        raise EctuneError("no dataset given; pass --data (e.g. fashion-mnist, cifar10:PATH, DIR, FILE.npz, FILE.zip)")
    if spec.lower() == "digits":
        return load_digits()
    path = Path(spec).expanduser()
    if spec.lower().endswith(".npz"):
        return load_npz(path)
    if spec.lower().endswith(".zip"):
        return load_zip(path)
    if path.is_dir():
        return load_fashion_mnist(path, split) if _has_fmnist_files(path) else load_image_folder(path)
    what = f"dataset path {path} does not exist" if "/" in spec and not path.exists() else f"unknown dataset {spec!r}"
    raise EctuneError(
        f"{what}: use 'fashion-mnist', 'fashion-mnist:DIR', 'cifar10:PATH', 'digits', "
        "a path to an .npz or .zip file, or a folder of images or Fashion-MNIST IDX files, optionally followed by "
        "[classes=0,2,4]"
    )
