"""Datasets held in memory as uint8 (N, C, H, W) tensors, and a resumable infinite batch sampler.

Sources: Fashion-MNIST IDX files, a folder of images, an ``.npz`` file, scikit-learn's 8x8 digits.
Every bad input raises EctuneError with a one-line message saying what was wrong and what to do.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import json
import math
import os
import struct
import sys
import tempfile
import urllib.request
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


def load_dataset(spec: str, split: str = "train") -> ImageDataset:
    """Load a dataset named by spec; `split` applies to Fashion-MNIST only (other sources have one).

    spec: "fashion-mnist" / "fmnist" (searched), "fashion-mnist:DIR", a folder holding Fashion-MNIST
    IDX files, a path ending in .npz, an image folder, or "digits" (needs scikit-learn).
    """
    _check_split(split)
    name, _, rest = spec.partition(":")
    if name.lower() in ("fashion-mnist", "fmnist"):
        return load_fashion_mnist(rest or None, split)
    if spec.lower() == "digits":
        return load_digits()
    path = Path(spec).expanduser()
    if spec.lower().endswith(".npz"):
        return load_npz(path)
    if path.is_dir():
        return load_fashion_mnist(path, split) if _has_fmnist_files(path) else load_image_folder(path)
    raise EctuneError(
        f"unknown dataset {spec!r}: use 'fashion-mnist', 'fashion-mnist:DIR', 'digits', "
        "a path to an .npz file, or a folder of images or Fashion-MNIST IDX files"
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
