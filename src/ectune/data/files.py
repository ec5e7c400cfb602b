"""Datasets from files: a folder of images, an .npz of arrays, an EDM-style .zip of images."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ectune.data.dataset import ImageDataset, _dataset
from ectune.errors import EctuneError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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


# --- EDM-style zip archives
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
