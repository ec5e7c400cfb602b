"""Specification of ectune.data: loaders accept good files, refuse bad ones with EctuneError, and the
sampler's stream is a pure function of (seed, position)."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import struct
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ectune import cli, data
from ectune.data import BatchSampler, ImageDataset, fmnist
from ectune.errors import EctuneError
from ectune.images import from_uint8

FMNIST_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ----------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (magic 00 00 08 ndim, big-endian dims, data)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fmnist(root: Path, n: int = 10, gz: bool = True, splits: tuple[str, ...] = ("train", "test")) -> None:
    """Fake Fashion-MNIST: n random 28x28 images and labels 0..9 per split."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in splits:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, array in zip(FMNIST_NAMES[split], (images, labels)):
            raw = idx_bytes(array)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (root / name).write_bytes(raw)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def gray(h: int = 8, w: int = 8, value: int = 7) -> np.ndarray:
    return np.full((h, w), value, dtype=np.uint8)


def rgb(h: int = 8, w: int = 8) -> np.ndarray:
    return np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)


@pytest.fixture
def no_fmnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide every default Fashion-MNIST location."""
    monkeypatch.delenv("ECTUNE_DATA", raising=False)
    monkeypatch.setattr(fmnist, "SYSTEM_FMNIST_DIR", tmp_path / "no-system")  # where the search path reads it
    monkeypatch.setenv("HOME", str(tmp_path / "no-home"))


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local HTTP server over a fresh folder: (folder, base url)."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(array)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = data.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    values = np.array([1, -2, 70000], dtype=">i4")
    path = tmp_path / "a.idx"
    path.write_bytes(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 3) + values.tobytes())
    np.testing.assert_array_equal(data.read_idx(path), [1, -2, 70000])


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\x00\x08",  # magic cut short
        b"\x01\x02\x08\x01" + b"\x00" * 8,  # bad magic
        b"\x00\x00\x08\x03\x00\x00",  # header cut short
        idx_bytes(np.zeros((4, 5), np.uint8))[:-3],  # data truncated
        idx_bytes(np.zeros((4, 5), np.uint8)) + b"xx",  # trailing bytes
        gzip.compress(idx_bytes(np.zeros((4, 5), np.uint8)))[:-6],  # truncated gzip stream
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(raw)
    with pytest.raises(EctuneError):
        data.read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EctuneError, match="cannot read"):
        data.read_idx(tmp_path / "nope.gz")


# ----------------------------------------------------------------------------- Fashion-MNIST


def check_fmnist(ds: ImageDataset, n: int) -> None:
    assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels is not None and ds.labels.dtype == torch.int64 and ds.labels.shape == (n,)
    assert 0 <= int(ds.labels.min()) and int(ds.labels.max()) <= 9
    assert ds.shape == (1, 28, 28) and ds.resolution == 28 and ds.channels == 1


@pytest.mark.parametrize("sub", ["", "fashion-mnist"])
def test_fmnist_via_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_fmnist: None, sub: str) -> None:
    write_fmnist(tmp_path / "data" / sub)
    monkeypatch.setenv("ECTUNE_DATA", str(tmp_path / "data"))
    check_fmnist(data.load_fashion_mnist(), 10)
    check_fmnist(data.load_fashion_mnist(split="test"), 10)
    check_fmnist(data.load_dataset("fmnist", split="test"), 10)


@pytest.mark.parametrize("gz", [False, True])
def test_fmnist_explicit_root(tmp_path: Path, gz: bool) -> None:
    write_fmnist(tmp_path / "fm", n=12, gz=gz)
    ds = data.load_fashion_mnist(tmp_path / "fm")
    check_fmnist(ds, 12)
    assert ds.num_classes == 10 and ds.name == "fashion-mnist-train"
    check_fmnist(data.load_dataset(f"fashion-mnist:{tmp_path / 'fm'}"), 12)
    check_fmnist(data.load_dataset(str(tmp_path / "fm"), split="test"), 12)


def test_fmnist_cache_dir_is_searched(tmp_path: Path, no_fmnist: None) -> None:
    write_fmnist(data.default_cache_dir(), splits=("train",))
    check_fmnist(data.load_fashion_mnist(), 10)


def test_fmnist_missing_says_how_to_get_it(tmp_path: Path, no_fmnist: None) -> None:
    with pytest.raises(EctuneError, match="apt-get install dataset-fashion-mnist") as info:
        data.load_fashion_mnist()
    assert "ECTUNE_DATA" in str(info.value) and "download" in str(info.value)
    with pytest.raises(EctuneError, match="ECTUNE_DATA"):
        data.load_fashion_mnist(tmp_path)


def test_fmnist_bad_split_and_mismatched_labels(tmp_path: Path) -> None:
    write_fmnist(tmp_path, n=10)
    with pytest.raises(EctuneError, match="split"):
        data.load_fashion_mnist(tmp_path, split="val")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(9, np.uint8))))
    with pytest.raises(EctuneError, match="labels"):
        data.load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not data.SYSTEM_FMNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    train = data.load_fashion_mnist(data.SYSTEM_FMNIST_DIR)
    test = data.load_fashion_mnist(data.SYSTEM_FMNIST_DIR, split="test")
    check_fmnist(train, 60000)
    check_fmnist(test, 10000)
    assert train.num_classes == 10 and torch.bincount(test.labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- download


def serve_fake_fmnist(served: Path) -> dict[str, str]:
    """Put fake .gz files in the served folder; return their md5s."""
    write_fmnist(served, n=5)
    return {name: hashlib.md5(p.read_bytes()).hexdigest() for name in data.FMNIST_MD5 for p in [served / name]}


def test_download_then_load(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    served, url = http_root
    md5 = serve_fake_fmnist(served)
    dest = data.download_fashion_mnist(tmp_path / "dl", url, checksums=md5)
    assert sorted(p.name for p in dest.iterdir()) == sorted(data.FMNIST_MD5)
    check_fmnist(data.load_fashion_mnist(dest), 5)
    for name in data.FMNIST_MD5:  # present and correct: not fetched again
        (served / name).unlink()
    data.download_fashion_mnist(dest, url, checksums=md5)


def test_download_checksum_mismatch_leaves_nothing(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    served, url = http_root
    md5 = serve_fake_fmnist(served)
    md5["train-images-idx3-ubyte.gz"] = "0" * 32
    with pytest.raises(EctuneError, match="checksum mismatch"):
        data.download_fashion_mnist(tmp_path / "dl", url, checksums=md5)
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_network_error(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    _, url = http_root  # nothing served: every file is a 404
    with pytest.raises(EctuneError, match="could not download"):
        data.download_fashion_mnist(tmp_path / "dl", url)
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_cli(
    tmp_path: Path, http_root: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served, url = http_root
    md5 = serve_fake_fmnist(served)
    args = ["download", "fashion-mnist", "--base-url", url, "--dest", str(tmp_path / "cli")]
    assert cli.main(args) == 2  # the official checksums do not match the fake files
    assert "checksum mismatch" in capsys.readouterr().err
    for name, digest in md5.items():
        monkeypatch.setitem(data.FMNIST_MD5, name, digest)
    assert cli.main(args) == 0
    check_fmnist(data.load_fashion_mnist(tmp_path / "cli", split="test"), 5)


# ----------------------------------------------------------------------------- image folder


def test_image_folder_gray_unlabelled(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / f"{i}.png", gray(6, 5, value=i))
    ds = data.load_image_folder(tmp_path)
    assert ds.images.shape == (3, 1, 6, 5) and ds.labels is None and ds.num_classes == 0
    assert ds.shape == (1, 6, 5) and ds.resolution == 6
    assert ds.images[:, 0, 0, 0].tolist() == [0, 1, 2]  # sorted paths


def test_image_folder_rgb_and_alpha_and_palette(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", rgb())
    Image.fromarray(rgb()).convert("RGBA").save(tmp_path / "b.png")
    Image.fromarray(rgb()).convert("P").save(tmp_path / "c.png")
    Image.fromarray(rgb()).save(tmp_path / "d.bmp")
    ds = data.load_image_folder(tmp_path)
    assert ds.images.shape == (4, 3, 8, 8) and ds.channels == 3
    np.testing.assert_array_equal(ds.images[0].permute(1, 2, 0).numpy(), rgb())
    np.testing.assert_array_equal(ds.images[1], ds.images[0])
    np.testing.assert_array_equal(ds.images[3], ds.images[0])


def test_image_folder_gray_alpha_is_one_channel(tmp_path: Path) -> None:
    Image.fromarray(gray()).convert("LA").save(tmp_path / "a.png")
    assert data.load_image_folder(tmp_path).channels == 1


def test_image_folder_subfolder_labels(tmp_path: Path) -> None:
    for cls, count in [("cat", 2), ("ant", 1), ("dog", 3)]:
        for i in range(count):
            write_png(tmp_path / cls / "deeper" / f"{i}.png", gray())
    ds = data.load_dataset(str(tmp_path))
    assert ds.labels is not None and ds.labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert ds.num_classes == 3


def test_image_folder_mixed_root_and_subfolders_is_unlabelled(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "0.png", gray())
    write_png(tmp_path / "1.png", gray())
    assert data.load_image_folder(tmp_path).labels is None


def test_image_folder_dataset_json(tmp_path: Path) -> None:
    rels = ["00000/img0.png", "00000/img1.png", "00001/img2.png"]
    for rel in rels:
        write_png(tmp_path / rel, rgb())
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[r, c] for r, c in zip(rels, [4, 0, 7])]}))
    ds = data.load_image_folder(tmp_path)
    assert ds.labels is not None and ds.labels.tolist() == [4, 0, 7] and ds.num_classes == 8
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": None}))
    assert data.load_image_folder(tmp_path).labels is None  # EDM's unlabelled form wins over subfolders


@pytest.mark.parametrize(
    "meta",
    ['{"labels": [["00000/img0.png", 1]]}', '{"labels": [["00000/img0.png", "x"]]}', "not json", "[1, 2]"],
)
def test_image_folder_bad_dataset_json(tmp_path: Path, meta: str) -> None:
    write_png(tmp_path / "00000" / "img0.png", gray())
    write_png(tmp_path / "00000" / "img1.png", gray())
    (tmp_path / "dataset.json").write_text(meta)
    with pytest.raises(EctuneError, match="dataset.json"):
        data.load_image_folder(tmp_path)


def test_image_folder_mixed_sizes(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", gray(8, 8))
    write_png(tmp_path / "b.png", gray(8, 9))
    with pytest.raises(EctuneError, match=r"b\.png.*\(1, 8, 9\).*\(1, 8, 8\)"):
        data.load_image_folder(tmp_path)


def test_image_folder_mixed_channels(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", gray())
    write_png(tmp_path / "b.png", rgb())
    with pytest.raises(EctuneError, match=r"b\.png.*\(3, 8, 8\)"):
        data.load_image_folder(tmp_path)


def test_image_folder_corrupt_file(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", gray())
    (tmp_path / "b.png").write_bytes(os.urandom(300))
    with pytest.raises(EctuneError, match=r"b\.png"):
        data.load_image_folder(tmp_path)


def test_image_folder_16_bit_refused(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(tmp_path / "a.png")
    with pytest.raises(EctuneError, match="8-bit"):
        data.load_image_folder(tmp_path)


def test_image_folder_empty_or_missing(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(EctuneError, match="no .* images"):
        data.load_image_folder(tmp_path)
    with pytest.raises(EctuneError, match="does not exist"):
        data.load_image_folder(tmp_path / "missing")


# ----------------------------------------------------------------------------- npz


def test_npz_gray_with_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 6, 5), np.uint8), labels=np.array([0, 3, 1, 3]))
    ds = data.load_dataset(str(tmp_path / "d.npz"))
    assert ds.images.shape == (4, 1, 6, 5) and ds.labels is not None and ds.labels.dtype == torch.int64
    assert ds.num_classes == 4 and ds.name == "d"


def test_npz_channels_last_rgb(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "d.npz", images=images)
    ds = data.load_npz(tmp_path / "d.npz")
    assert ds.images.shape == (3, 3, 4, 5) and ds.labels is None
    np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), images)


def test_npz_channels_first_from_ectune_sample(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images=images)
    np.testing.assert_array_equal(data.load_npz(tmp_path / "s.npz").images.numpy(), images)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": np.zeros((2, 4, 4), np.float32)}, "uint8"),
        ({"pixels": np.zeros((2, 4, 4), np.uint8)}, "no 'images'"),
        ({"images": np.zeros((2, 5, 4, 2), np.uint8)}, "channels-last"),
        ({"images": np.zeros((4, 4), np.uint8)}, "channels-last"),
        ({"images": np.zeros((0, 4, 4), np.uint8)}, "empty"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, np.int64)}, "labels"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2, np.float32)}, "labels"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, -1])}, "labels"),
        ({"images": np.array([None, None], dtype=object)}, "pickled"),
    ],
)
def test_npz_rejects(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(EctuneError, match=match):
        data.load_npz(tmp_path / "d.npz")


def test_npz_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "text.npz").write_text("hello")
    np.save(tmp_path / "single.npy", np.zeros((2, 4, 4), np.uint8))
    os.replace(tmp_path / "single.npy", tmp_path / "single.npz")
    with pytest.raises(EctuneError, match="not a readable"):
        data.load_npz(tmp_path / "text.npz")
    with pytest.raises(EctuneError, match="single .npy"):
        data.load_npz(tmp_path / "single.npz")
    with pytest.raises(EctuneError, match="does not exist"):
        data.load_npz(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- dataset, dispatch


def test_batch_is_exactly_minus_one_to_one() -> None:
    """A training batch: the dataset's uint8 images through `from_uint8`, the one uint8 → [-1, 1] rule."""
    images = torch.tensor([0, 255, 127, 128], dtype=torch.uint8).reshape(4, 1, 1, 1)
    ds = ImageDataset(images, torch.tensor([1, 0, 1, 0]), "t")
    x, y = from_uint8(ds.images[[0, 1, 2, 3]]), ds.labels[[0, 1, 2, 3]]
    assert x.dtype == torch.float32 and x.shape == (4, 1, 1, 1)
    assert x.flatten().tolist()[:2] == [-1.0, 1.0] and bool((x.abs() <= 1).all())
    assert y is not None and y.tolist() == [1, 0, 1, 0] and len(ds) == 4
    unlabelled = ImageDataset(images, None, "t")
    x, y = from_uint8(unlabelled.images[torch.tensor([1])]), unlabelled.labels
    assert x.item() == 1.0 and y is None


@pytest.mark.parametrize(
    ("images", "labels"),
    [
        (torch.zeros(2, 1, 4, 4), None),  # float images
        (torch.zeros(2, 4, 4, dtype=torch.uint8), None),  # missing channel axis
        (torch.zeros(0, 1, 4, 4, dtype=torch.uint8), None),  # empty
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64)),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32)),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, -1])),
    ],
)
def test_image_dataset_validates(images: torch.Tensor, labels: torch.Tensor | None) -> None:
    with pytest.raises(EctuneError):
        ImageDataset(images, labels, "bad")


def test_load_dataset_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(EctuneError, match="fashion-mnist.*digits.*npz"):
        data.load_dataset(str(tmp_path / "nothing-here"))


def test_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(EctuneError, match="scikit-learn"):
        data.load_dataset("digits")


def test_digits_scaling_with_a_stub_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = types.ModuleType("sklearn.datasets")
    bunch = types.SimpleNamespace(images=np.array([[[0.0, 8.0], [16.0, 1.0]]]), target=np.array([3]))
    stub.load_digits = lambda: bunch  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", stub)
    ds = data.load_dataset("digits")
    assert ds.images.flatten().tolist() == [0, 128, 255, 16] and ds.labels.tolist() == [3]


def test_digits_with_sklearn() -> None:
    pytest.importorskip("sklearn")
    ds = data.load_dataset("digits")
    assert ds.images.shape == (1797, 1, 8, 8) and ds.num_classes == 10
    assert int(ds.images.max()) == 255 and int(ds.images.min()) == 0


# ----------------------------------------------------------------------------- sampler


def take(sampler: BatchSampler, k: int) -> list[list[int]]:
    return [sampler.next_batch().tolist() for _ in range(k)]


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (7, 7), (5, 12)])
def test_sampler_each_index_once_per_epoch(n: int, batch_size: int) -> None:
    sampler = BatchSampler(n, batch_size, seed=1)
    stream = torch.cat([sampler.next_batch() for _ in range(4 * n)])  # 4 * batch_size epochs
    assert stream.dtype == torch.int64
    for epoch in stream.reshape(-1, n):
        assert sorted(epoch.tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # epochs are reshuffled


def test_sampler_is_deterministic_per_seed() -> None:
    assert take(BatchSampler(50, 8, seed=3), 20) == take(BatchSampler(50, 8, seed=3), 20)
    assert take(BatchSampler(50, 8, seed=3), 20) != take(BatchSampler(50, 8, seed=4), 20)


@pytest.mark.parametrize("stop", [0, 1, 3, 4, 5, 9])  # n=10, batch 3: batch 3 straddles epochs 0 and 1
def test_sampler_resume_is_exact(stop: int) -> None:
    reference = take(BatchSampler(10, 3, seed=7), 15)
    first = BatchSampler(10, 3, seed=7)
    head = take(first, stop)
    resumed = BatchSampler(10, 3, seed=7)
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 15 - stop) == reference
    by_position = BatchSampler(10, 3, seed=7, position=3 * stop)
    assert take(by_position, 15 - stop) == reference[stop:]


def test_sampler_ranks_concatenate_to_global_batch() -> None:
    whole = take(BatchSampler(11, 4, seed=2), 9)
    ranks = [take(BatchSampler(11, 4, seed=2, rank=r, world_size=2), 9) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == whole


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(EctuneError, match="divide"):
        BatchSampler(10, 5, seed=0, world_size=2)
    with pytest.raises(EctuneError, match="rank"):
        BatchSampler(10, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(EctuneError):
        BatchSampler(0, 4, seed=0)
    with pytest.raises(EctuneError, match="same dataset and seed"):
        BatchSampler(10, 4, seed=0).load_state_dict(BatchSampler(10, 4, seed=1).state_dict())


# ----------------------------------------------------------------------------- fuzz


def fuzz_bytes(prefix: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, some starting with a plausible magic number so parsers get further in."""
    return st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: prefix + b))


@settings(max_examples=50, deadline=None)
@given(raw=fuzz_bytes(b"\x00\x00\x08\x03"), gz=st.booleans())
def test_fuzz_idx(raw: bytes, gz: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(EctuneError):
        path = Path(tmp) / "x.idx"
        path.write_bytes(gzip.compress(raw) if gz else raw)
        assert isinstance(data.read_idx(path), np.ndarray)


@settings(max_examples=50, deadline=None)
@given(raw=fuzz_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"))
def test_fuzz_png(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(EctuneError):
        (Path(tmp) / "x.png").write_bytes(raw)
        assert len(data.load_image_folder(tmp)) == 1


@settings(max_examples=50, deadline=None)
@given(raw=fuzz_bytes(b"PK\x03\x04"))
def test_fuzz_npz(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(EctuneError):
        (Path(tmp) / "x.npz").write_bytes(raw)
        assert len(data.load_npz(Path(tmp) / "x.npz")) >= 1
