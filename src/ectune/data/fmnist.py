"""Fashion-MNIST: IDX reading, where the files are looked for, and a checksummed download
(`ectune download fashion-mnist` runs it)."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ectune.data.dataset import ImageDataset, _dataset
from ectune.errors import EctuneError

OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
SYSTEM_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_DOWNLOAD_TIMEOUT_S = 60.0
_GET_FMNIST = (
    "install it with `sudo apt-get install dataset-fashion-mnist`, set ECTUNE_DATA to a folder "
    "holding the IDX files, or run `ectune download fashion-mnist`"
)


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
                "the file is corrupt or the mirror is wrong, try again or use another mirror (--base-url)"
            )
        os.replace(tmp, target)
    except (OSError, http.client.HTTPException) as e:
        raise EctuneError(
            f"could not download {url}: {e}; check the network, pass a mirror with "
            "`ectune download fashion-mnist --base-url URL`, or `sudo apt-get install dataset-fashion-mnist`"
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
