"""CIFAR-10 from the official python tarball (or its unpacked folder), read with a restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from ectune.data.dataset import ImageDataset, _dataset
from ectune.data.fmnist import _check_split
from ectune.errors import EctuneError

# --- CIFAR-10 (official python tarball)
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
_CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_GET_CIFAR10 = (f"download {CIFAR10_TARBALL} from https://www.cs.toronto.edu/~kriz/cifar.html and pass "
                "--data cifar10:PATH (the tarball or the folder it unpacks to), or put it in $ECTUNE_DATA")


def _array_from_pickle(subtype, shape, dtype) -> np.ndarray:
    """numpy's pickle reconstructor for plain arrays (no subclasses); the data arrives in BUILD."""
    if subtype is not np.ndarray:
        raise EctuneError("refusing to unpickle an ndarray subclass")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


_ARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _array_from_pickle,
                  ("numpy._core.multiarray", "_reconstruct"): _array_from_pickle,
                  ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, str/bytes, numbers and numpy arrays only; any other global raises."""

    def __init__(self, raw: bytes, source: str):
        super().__init__(io.BytesIO(raw), encoding="bytes")        # Python 2 pickles: str -> bytes
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ARRAY_GLOBALS:
            raise EctuneError(f"refusing to read {self.source}: it would import {module}.{name}; "
                              "a genuine CIFAR-10 batch holds only arrays, lists and strings")
        return _ARRAY_GLOBALS[(module, name)]


def _cifar10_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels (N,)) of one pickled CIFAR-10 batch dict."""
    try:
        batch = _ArrayUnpickler(raw, source).load()
    except EctuneError:
        raise
    except Exception as e:  # a truncated or foreign pickle raises many types
        raise EctuneError(f"{source} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
                          "download the tarball again") from None
    get = (lambda k: batch.get(k.encode(), batch.get(k))) if isinstance(batch, dict) else (lambda k: None)
    data, labels = get("data"), get("labels")
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
    if not ok or not isinstance(labels, list) or len(labels) != len(data):
        raise EctuneError(f"{source} is not a CIFAR-10 batch (expected 'data' uint8 N x 3072 and N 'labels'); "
                          "download the tarball again")
    labels = np.array(labels)
    if labels.dtype.kind not in "iu" or (labels.size and not 0 <= labels.min() <= labels.max() <= 9):
        raise EctuneError(f"{source}: labels must be integers 0..9; download the tarball again")
    return data.reshape(-1, 3, 32, 32), labels                      # rows are R, G, B planes of 32x32


def _cifar10_source(path: str | Path | None) -> Path:
    """The tarball or batch folder named by `path`, or found in $ECTUNE_DATA[/cifar10] or the cache."""
    env = os.environ.get("ECTUNE_DATA")
    roots = [Path(path).expanduser()] if path else (
        [Path(env), Path(env) / "cifar10"] if env else []) + [Path.home() / ".cache" / "ectune" / "cifar10"]
    for root in roots:
        for cand in (root, root / "cifar-10-batches-py", root / CIFAR10_TARBALL):
            if cand.is_file() or (cand / "data_batch_1").is_file() or (cand / "test_batch").is_file():
                return cand
    raise EctuneError(f"CIFAR-10 not found in {', '.join(map(str, roots))}; {_GET_CIFAR10}")


def _cifar10_members(source: Path, names: list[str]) -> list[tuple[str, bytes]]:
    """(name, bytes) of the named batch files, from the tarball or the folder."""
    if source.is_dir():
        missing = [n for n in names if not (source / n).is_file()]
        if missing:
            raise EctuneError(f"{source} lacks CIFAR-10 batch files {missing}; unpack the whole tarball there")
        return [(f"{source / n}", (source / n).read_bytes()) for n in names]
    found = {}
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:                                      # one pass: gzip cannot seek back cheaply
                name = PurePosixPath(member.name).name
                if member.isfile() and name in names:
                    found[name] = (f"{source}:{member.name}", tar.extractfile(member).read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise EctuneError(f"cannot read {source} as a tarball ({e}); {_GET_CIFAR10}") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise EctuneError(f"{source} lacks CIFAR-10 batch files {missing}; is it {CIFAR10_TARBALL}?")
    return [found[n] for n in names]


def load_cifar10(path: str | Path | None = None, split: str = "train") -> ImageDataset:
    """CIFAR-10 `split` from the official python tarball or its unpacked folder: images uint8
    (N, 3, 32, 32) and labels 0..9 (train: data_batch_1..5, 50,000 images; test: test_batch, 10,000).

    The batches are pickles; they are read with an unpickler that only rebuilds arrays and lists.
    """
    _check_split(split)
    source = _cifar10_source(path)
    parts = [_cifar10_batch(raw, name) for name, raw in _cifar10_members(source, _CIFAR10_BATCHES[split])]
    images = np.concatenate([x for x, _ in parts])
    return _dataset(images, np.concatenate([y for _, y in parts]), f"cifar10-{split}")
