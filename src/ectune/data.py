"""Datasets held in memory as uint8 (N, C, H, W) tensors, and a resumable infinite batch sampler.

Sources: Fashion-MNIST IDX files, CIFAR-10's python tarball, a folder or EDM-style ``.zip`` of images,
an ``.npz`` file, scikit-learn's 8x8 digits.
Every bad input raises EctuneError with a one-line message saying what was wrong and what to do.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import pickle
import struct
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from ectune.errors import EctuneError

OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
SYSTEM_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_DOWNLOAD_TIMEOUT_S = 60.0
_GET_FMNIST = (
    "install it with `sudo apt-get install dataset-fashion-mnist`, set ECTUNE_DATA to a folder "
    "holding the IDX files, or run `python -m ectune.data download fashion-mnist` "
    "(same as `ectune download fashion-mnist`)"
)


# --- the dataset
@dataclass
class ImageDataset:
    """A whole dataset in memory: images uint8 (N, C, H, W), labels int64 (N,) or None."""

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str

    def __post_init__(self) -> None:
        imgs = self.images
        if imgs.dtype != torch.uint8 or imgs.ndim != 4 or len(imgs) == 0:
            raise EctuneError(
                f"dataset {self.name!r}: images must be a non-empty uint8 (N, C, H, W) tensor, "
                f"got {imgs.dtype} {tuple(imgs.shape)}; convert them before building ImageDataset"
            )
        lab = self.labels
        if lab is not None and (lab.dtype != torch.int64 or tuple(lab.shape) != (len(imgs),)):
            raise EctuneError(
                f"dataset {self.name!r}: labels must be int64 of shape ({len(imgs)},), "
                f"got {lab.dtype} {tuple(lab.shape)}; pass one integer class per image or None"
            )
        if lab is not None and int(lab.min()) < 0:
            raise EctuneError(f"dataset {self.name!r}: labels must be >= 0; renumber the classes")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def resolution(self) -> int:
        """Image height H (equal to the width for all built-in datasets; see `shape`)."""
        return self.shape[1]

    @property
    def num_classes(self) -> int:
        """max(label) + 1, or 0 for an unlabelled dataset."""
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images at `indices` as float32 (B, C, H, W) in [-1, 1] (x / 127.5 - 1), labels (B,) or None."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[idx].to(torch.float32) / 127.5 - 1.0
        return x, None if self.labels is None else self.labels[idx]


def _dataset(images: np.ndarray, labels: np.ndarray | None, name: str) -> ImageDataset:
    """Wrap numpy images (N, C, H, W) uint8 and labels (N,) integer as an ImageDataset."""
    lab = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)), lab, name)


# --- Fashion-MNIST (IDX)
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzipped or raw: magic 00 00 <dtype> <ndim>, ndim big-endian uint32 sizes, data.

    Returns the array with the shape given by the header, in native byte order.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise EctuneError(f"cannot read IDX file {path}: {e}; check the path or download it again") from e
    return _parse_idx(raw, path)


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """Decode the bytes of an IDX file; the data must be exactly as long as the header says."""
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise EctuneError(
            f"{path} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'}); "
            "expected MNIST-style *-idx?-ubyte files"
        )
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise EctuneError(f"{path} is truncated inside its header; download it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    expected, found = count * dtype.itemsize, len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise EctuneError(
            f"{path} is {what}: shape {dims} needs {expected} data bytes, found {found}; download it again"
        )
    array = np.frombuffer(raw, dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable native-order copy


def _fmnist_paths(root: Path, split: str) -> tuple[Path, Path] | None:
    """(images, labels) IDX paths of `split` under root, raw or .gz; None if either is missing."""
    prefix = _SPLIT_PREFIX[split]
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        options = [root / f"{prefix}-{kind}-ubyte{ext}" for ext in ("", ".gz")]
        existing = [p for p in options if p.is_file()]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


def _has_fmnist_files(root: Path) -> bool:
    return any(_fmnist_paths(root, split) is not None for split in _SPLIT_PREFIX)


def default_cache_dir() -> Path:
    """Where `download` puts Fashion-MNIST by default: ~/.cache/ectune/fashion-mnist."""
    return Path.home() / ".cache" / "ectune" / "fashion-mnist"


def fashion_mnist_search_dirs() -> list[Path]:
    """Folders searched in order: $ECTUNE_DATA, $ECTUNE_DATA/fashion-mnist, the Debian folder, the cache."""
    env = os.environ.get("ECTUNE_DATA")
    dirs = [Path(env), Path(env) / "fashion-mnist"] if env else []
    return dirs + [SYSTEM_FMNIST_DIR, default_cache_dir()]


def _check_split(split: str) -> None:
    if split not in _SPLIT_PREFIX:
        raise EctuneError(f"unknown split {split!r}; use 'train' or 'test'")


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> ImageDataset:
    """Fashion-MNIST `split` as images uint8 (N, 1, 28, 28) and labels int64 (N,) in 0..9.

    With root None, the first folder of `fashion_mnist_search_dirs()` holding the files is used.
    """
    _check_split(split)
    dirs = fashion_mnist_search_dirs() if root is None else [Path(root)]
    paths = next((p for p in (_fmnist_paths(d, split) for d in dirs) if p is not None), None)
    if paths is None:
        where = ", ".join(str(d) for d in dirs)
        raise EctuneError(f"Fashion-MNIST {split} files not found in {where}; {_GET_FMNIST}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) == 0:
        raise EctuneError(f"{paths[0]} must hold uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise EctuneError(
            f"{paths[1]} must hold {len(images)} uint8 labels to match {paths[0].name}, "
            f"got {labels.dtype} {labels.shape}; download both files again"
        )
    return _dataset(images[:, None], labels, f"fashion-mnist-{split}")


# --- download
def _md5(path: Path) -> str:
    """Hex md5 of a file, or "" if it cannot be read (so it is fetched again)."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def _download_one(url: str, target: Path, md5: str) -> None:
    """Fetch url into a temp file beside target; rename it to target only if its md5 matches."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as e:
        raise EctuneError(f"cannot write to {target.parent}: {e}; pass a writable --dest") from e
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise EctuneError(
                f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}; "
                "the file is corrupt or the mirror is wrong, try again or use another base_url"
            )
        os.replace(tmp, target)
    except (OSError, http.client.HTTPException) as e:
        raise EctuneError(
            f"could not download {url}: {e}; check the network or pass a mirror as base_url (--base-url), "
            "or `sudo apt-get install dataset-fashion-mnist`"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)


def download_fashion_mnist(
    dest: str | Path, base_url: str = OFFICIAL_URL, *, checksums: Mapping[str, str] = FMNIST_MD5
) -> Path:
    """Download the four Fashion-MNIST .gz files into dest, verify md5s, skip good ones; return dest."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EctuneError(f"cannot create {dest}: {e}; pass a writable --dest") from e
    for name in FMNIST_MD5:
        if name not in checksums:
            raise EctuneError(f"no checksum given for {name}; pass checksums for all of {list(FMNIST_MD5)}")
        target = dest / name
        if target.is_file() and _md5(target) == checksums[name]:
            continue
        _download_one(base_url.rstrip("/") + "/" + name, target, checksums[name])
    return dest


# --- image folder
def _to_array(im: Image.Image, path: Path) -> np.ndarray:
    """Pixels as uint8 (C, H, W): L/1/LA -> 1 channel; RGB, RGBA, P, CMYK, ... -> 3 channels.

    Alpha is dropped; 16-bit and float images are refused rather than silently clipped.
    """
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        raise EctuneError(f"{path} has {mode} pixels (16-bit or float); convert it to 8-bit first")
    if mode in ("L", "1", "LA", "La"):
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA").convert("RGB")  # palette transparency needs RGBA first
    else:
        im = im.convert("RGB")
    array = np.asarray(im, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _read_image(path: Path) -> np.ndarray:
    """Decode one image file as uint8 (C, H, W)."""
    try:
        with Image.open(path, formats=("PNG", "JPEG", "BMP", "WEBP")) as im:
            im.load()
            return _to_array(im, path)
    except EctuneError:
        raise
    except Exception as e:  # Pillow's decoders raise many types on a bad file; all mean "unreadable"
        raise EctuneError(f"cannot read image {path}: {e}; delete or re-export the file") from e


def _image_paths(root: Path) -> list[Path]:
    """Image files under root, recursively, as sorted relative paths."""
    if not root.is_dir():
        raise EctuneError(f"image folder {root} does not exist or is not a folder; check the path")
    rels = sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not rels:
        raise EctuneError(f"no {'/'.join(IMAGE_SUFFIXES)} images found in {root}; check the path")
    return rels


def _json_labels(root: Path, rels: list[Path]) -> np.ndarray | None:
    """Labels from EDM's dataset.json {"labels": [["rel/path.png", int], ...]} (or "labels": null)."""
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EctuneError(f"cannot parse {meta_path}: {e}; fix or remove it") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("labels", []), (list, type(None))):
        raise EctuneError(f"{meta_path} must be a JSON object {{\"labels\": [[path, class], ...] or null}}")
    if meta.get("labels") is None:
        return None
    table: dict[str, int] = {}
    for entry in meta["labels"]:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        if not (ok and type(entry[1]) is int and entry[1] >= 0):
            raise EctuneError(f"{meta_path}: expected 'labels': [[\"path.png\", class >= 0], ...], got {entry!r}")
        table[PurePosixPath(entry[0].replace("\\", "/")).as_posix()] = entry[1]
    missing = next((r for r in rels if r.as_posix() not in table), None)
    if missing is not None:
        raise EctuneError(f"{meta_path} has no label for {missing.as_posix()}; add it or remove the image")
    return np.array([table[r.as_posix()] for r in rels], dtype=np.int64)


def _folder_labels(rels: list[Path]) -> np.ndarray | None:
    """Class ids from sorted first-level subfolder names, if every image sits in one; else None."""
    if any(len(r.parts) < 2 for r in rels):
        return None
    classes = {name: i for i, name in enumerate(sorted({r.parts[0] for r in rels}))}
    return np.array([classes[r.parts[0]] for r in rels], dtype=np.int64)


def load_image_folder(path: str | Path) -> ImageDataset:
    """All images under `path` (sorted, recursive) as uint8 (N, C, H, W); C is 1 for gray, 3 for colour.

    Labels come from `dataset.json` if present, else from first-level subfolders, else none.
    """
    root = Path(path)
    rels = _image_paths(root)
    arrays = [_read_image(root / rels[0])]
    for rel in rels[1:]:
        arrays.append(_read_image(root / rel))
        if arrays[-1].shape != arrays[0].shape:
            raise EctuneError(
                f"{root / rel} has shape (C, H, W) = {arrays[-1].shape} but {rels[0]} has {arrays[0].shape}; "
                "all images must share size and channels, resize or convert them first"
            )
    has_json = (root / "dataset.json").is_file()
    labels = _json_labels(root, rels) if has_json else _folder_labels(rels)
    return _dataset(np.stack(arrays), labels, root.resolve().name or str(root))


# --- .npz
def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The `images` and optional `labels` arrays of an .npz file (never unpickles)."""
    try:
        f = path.open("rb")  # our own handle: np.load leaks its own when the zip is corrupt
    except OSError as e:
        raise EctuneError(f"cannot open {path}: {e}; check the path and its permissions") from e
    with f:
        try:
            archive = np.load(f, allow_pickle=False)
        except Exception as e:  # numpy/zipfile raise many types on a bad file; all mean "not an npz"
            raise EctuneError(f"{path} is not a readable .npz file ({e}); save one with numpy.savez") from e
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise EctuneError(f"{path} is a single .npy array, not an .npz; save it with numpy.savez(path, images=x)")
        with archive:
            return _npz_arrays(archive, path)


def _npz_arrays(archive: np.lib.npyio.NpzFile, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode `images` and, if present, `labels` from an open archive."""
    if "images" not in archive.files:
        raise EctuneError(f"{path} has keys {archive.files} but no 'images'; save with numpy.savez(path, images=x)")
    try:
        labels = archive["labels"] if "labels" in archive.files else None
        return archive["images"], labels
    except Exception as e:  # corrupt member, object dtype, bad zip entry, ...
        raise EctuneError(f"{path} has a corrupt or pickled array ({e}); save it again with numpy.savez") from e


def _npz_images(images: np.ndarray, path: Path) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) -> (N, C, H, W); C in 1, 3, 4.

    (N, C, H, W) as written by `ectune sample` is kept too when it cannot be read as channels-last.
    """
    if images.dtype != np.uint8:
        raise EctuneError(f"{path}: images must be uint8 in 0..255, got {images.dtype}; convert with np.uint8")
    channels_last = images.ndim == 4 and images.shape[3] in (1, 3, 4)
    if images.ndim == 3:
        images = images[:, None]
    elif channels_last:
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise EctuneError(
            f"{path}: images must be (N, H, W) or channels-last (N, H, W, C) with C in 1, 3, 4, "
            f"got {images.shape}; reshape them before saving"
        )
    if 0 in images.shape:
        raise EctuneError(f"{path}: images array {images.shape} is empty; save at least one image")
    return images


def load_npz(path: str | Path) -> ImageDataset:
    """An .npz with `images` uint8 (N, H, W) or (N, H, W, C) and optional integer `labels` (N,)."""
    path = Path(path)
    if not path.is_file():
        raise EctuneError(f"{path} does not exist; check the path")
    images, labels = _read_npz(path)
    images = _npz_images(images, path)
    if labels is not None:
        ok = np.issubdtype(labels.dtype, np.integer) and labels.shape == (len(images),)
        if not ok or (labels.size and labels.min() < 0):
            raise EctuneError(f"{path}: labels must be {len(images)} ints >= 0, got {labels.dtype} {labels.shape}")
    return _dataset(images, labels, path.stem)


# --- CIFAR-10 (official python tarball) and EDM-style zip archives
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


def _zip_labels(archive: zipfile.ZipFile, path: Path, names: list[str]) -> np.ndarray | None:
    """Integer labels from the archive's dataset.json {"labels": [[name, class], ...] or null}."""
    if "dataset.json" not in archive.namelist():
        return None
    try:
        meta = json.loads(archive.read("dataset.json").decode("utf-8"))
    except (ValueError, zipfile.BadZipFile, OSError) as e:
        raise EctuneError(f"cannot parse dataset.json in {path}: {e}; fix or remove it") from None
    entries = meta.get("labels") if isinstance(meta, dict) else []
    if entries is None:
        return None
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int and e[1] >= 0
            for e in entries):
        raise EctuneError(f"dataset.json in {path} must be {{\"labels\": [[\"name.png\", class >= 0], ...]}}")
    table = {name.replace("\\", "/"): label for name, label in entries}
    missing = next((n for n in names if n not in table), None)
    if missing is not None:
        raise EctuneError(f"dataset.json in {path} has no label for {missing}; add it or remove the image")
    return np.array([table[n] for n in names], dtype=np.int64)


def load_zip(path: str | Path) -> ImageDataset:
    """An EDM-style zip of images (sorted by name, any folder depth) with optional dataset.json labels."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist()
                           if PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES and not n.endswith("/"))
            if not names:
                raise EctuneError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {path}; check the archive")
            arrays = []
            for name in names:
                where = Path(f"{path}:{name}")
                try:
                    with Image.open(io.BytesIO(archive.read(name)), formats=("PNG", "JPEG", "BMP", "WEBP")) as im:
                        im.load()
                        arrays.append(_to_array(im, where))
                except EctuneError:
                    raise
                except Exception as e:  # Pillow's decoders raise many types on a bad file
                    raise EctuneError(f"cannot read image {where}: {e}; re-export the archive") from None
                if arrays[-1].shape != arrays[0].shape:
                    raise EctuneError(f"{where} has shape (C, H, W) = {arrays[-1].shape} but {names[0]} has "
                                      f"{arrays[0].shape}; all images must share size and channels")
            labels = _zip_labels(archive, path, names)
    except (zipfile.BadZipFile, OSError) as e:
        raise EctuneError(f"cannot read {path} as a zip archive ({e}); check the path") from None
    return _dataset(np.stack(arrays), labels, path.stem)


# --- digits and dispatch
def load_digits() -> ImageDataset:
    """scikit-learn's 8x8 digits: images uint8 (1797, 1, 8, 8) scaled from 0..16 to 0..255, labels 0..9."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise EctuneError("dataset 'digits' needs scikit-learn: pip install scikit-learn, or use fashion-mnist") from e
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


# --- sampler
class BatchSampler:
    """Deterministic infinite stream of index batches over n items, resumable exactly.

    Epoch e visits all n indices in the order of torch.randperm(n) seeded with seed * 1_000_003 + e;
    global batches of batch_size run across epoch boundaries without a gap. Rank r of world_size
    gets the r-th contiguous slice (batch_size // world_size,) of every global batch. `position`
    counts the global samples consumed so far, so it is the whole state besides the fixed arguments.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, position: int = 0):
        if n < 1 or batch_size < 1 or position < 0:
            raise EctuneError(f"sampler needs n, batch_size >= 1 and position >= 0; got {n}, {batch_size}, {position}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise EctuneError(
                f"batch_size {batch_size} must divide evenly over world_size {world_size} "
                f"with 0 <= rank ({rank}) < world_size; change the batch size or the number of processes"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, position
        self._cached: tuple[int, torch.Tensor] | None = None

    @property
    def epoch(self) -> int:
        return self.position // self.n

    def _permutation(self, epoch: int) -> torch.Tensor:
        """The index order (n,) of one epoch."""
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._cached = (epoch, torch.randperm(self.n, generator=gen))
        return self._cached[1]

    def _indices(self, start: int, count: int) -> torch.Tensor:
        """Indices (count,) at global sample positions start .. start + count - 1."""
        parts = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            take = min(count, self.n - offset)
            parts.append(self._permutation(epoch)[offset : offset + take])
            start, count = start + take, count - take
        return torch.cat(parts)

    def next_batch(self) -> torch.Tensor:
        """This rank's indices, int64 (batch_size // world_size,); advances position by batch_size."""
        local = self.batch_size // self.world_size
        indices = self._indices(self.position + self.rank * local, local)
        self.position += self.batch_size
        return indices

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "batch_size": self.batch_size, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at state["position"]; n and seed must match (batch size and world size may change)."""
        if state.get("n") != self.n or state.get("seed") != self.seed:
            raise EctuneError(
                f"sampler state is for n={state.get('n')}, seed={state.get('seed')} but this run has "
                f"n={self.n}, seed={self.seed}; resume with the same dataset and seed"
            )
        self.position = int(state["position"])


# --- command line
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ectune.data download fashion-mnist [--dest DIR] [--base-url URL]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ectune.data", description="Fetch ectune datasets.")
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download a dataset and verify its checksums")
    download.add_argument("dataset", choices=["fashion-mnist", "fmnist"])
    download.add_argument("--dest", type=Path, default=None, help=f"folder (default {default_cache_dir()})")
    download.add_argument("--base-url", default=OFFICIAL_URL, help="a mirror of the official files")
    args = parser.parse_args(argv)
    try:
        dest = download_fashion_mnist(args.dest or default_cache_dir(), args.base_url)
    except EctuneError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    sys.stdout.write(f"Fashion-MNIST is in {dest}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
