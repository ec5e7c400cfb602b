"""CIFAR-10 from its official python tarball and EDM-style zip datasets, built small in tmp_path."""

import io
import json
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ectune.data import load_cifar10, load_dataset, load_zip
from ectune.errors import EctuneError


class _Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2's cPickle wrote CIFAR-10 (protocol 2, str as SHORT_BINSTRING/
    BINSTRING, numpy globals under numpy.core.multiarray), so the loader sees the real format."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_batch(rng, n, name):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    raw = py2_pickle({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                      b"filenames": [f"img_{i}.png".encode() for i in range(n)]})
    return raw, data, labels


@pytest.fixture
def cifar(tmp_path):
    """A CIFAR-10 tarball with 3 images per batch (15 train, 4 test), plus the expected arrays."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = {"train": ([], []), "test": ([], [])}
    for name, n, split in [(f"data_batch_{i}", 3, "train") for i in range(1, 6)] + [("test_batch", 4, "test")]:
        raw, data, labels = cifar_batch(rng, n, name)
        (folder / name).write_bytes(raw)
        expected[split][0].append(data)
        expected[split][1].extend(labels)
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": [b"airplane"] * 10}))
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return tarball, folder, {k: (np.concatenate(v[0]), np.array(v[1])) for k, v in expected.items()}


def test_fixture_is_in_the_official_python2_format(cifar):
    raw = (cifar[1] / "data_batch_1").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"U\x04data" in raw
    assert pickle.loads(raw, encoding="bytes")[b"data"].shape == (3, 3072)


@pytest.mark.parametrize("where", ["tarball", "folder", "parent"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_reads_tarball_and_folder(cifar, where, split):
    tarball, folder, expected = cifar
    path = {"tarball": tarball, "folder": folder, "parent": folder.parent}[where]
    ds = load_dataset(f"cifar10:{path}", split)
    data, labels = expected[split]
    assert ds.images.shape == (len(data), 3, 32, 32) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.labels, torch.from_numpy(labels))
    # channel c of pixel (y, x) is byte c*1024 + y*32 + x of the row
    assert ds.images[1, 2, 5, 7].item() == data[1, 2 * 1024 + 5 * 32 + 7]
    assert ds.name == f"cifar10-{split}"


def test_cifar10_found_through_ectune_data(cifar, monkeypatch):
    monkeypatch.setenv("ECTUNE_DATA", str(cifar[0].parent))
    assert len(load_dataset("cifar10")) == 15


def test_cifar10_batch_that_runs_code_is_refused(cifar, tmp_path):
    folder = cifar[1]
    target = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {target}",)

    (folder / "data_batch_3").write_bytes(py2_pickle({b"data": RunsCode()}))
    with pytest.raises(EctuneError, match=r"refusing to read .*data_batch_3: it would import (posix|nt)\.system"):
        load_cifar10(folder)
    assert not target.exists()


def test_cifar10_errors(cifar, tmp_path):
    tarball, folder, _ = cifar
    with pytest.raises(EctuneError, match="CIFAR-10 not found"):
        load_cifar10(tmp_path / "nowhere")
    (folder / "test_batch").write_bytes(py2_pickle({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(EctuneError, match="not a CIFAR-10 batch"):
        load_cifar10(folder, "test")
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(EctuneError, match="not a readable CIFAR-10 batch"):
        load_cifar10(folder, "test")
    (folder / "data_batch_5").unlink()
    with pytest.raises(EctuneError, match=r"lacks CIFAR-10 batch files \['data_batch_5'\]"):
        load_cifar10(folder)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(tarball.read_bytes()[:200])
    with pytest.raises(EctuneError, match="cannot read .* as a tarball"):
        load_cifar10(broken)


# --- EDM-style zip datasets
def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path, images: dict, labels=None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in images.items():
            zf.writestr(name, _png(array))
        if labels is not None:
            zf.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


@pytest.fixture
def rgb_images():
    rng = np.random.default_rng(1)
    # EDM's dataset_tool layout: 00000/img00000000.png, ... (named out of order here on purpose)
    names = ["00000/img00000002.png", "00000/img00000000.png", "00001/img00000001.png"]
    return {n: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for n in names}


def test_zip_with_labels(tmp_path, rgb_images):
    labels = [[n, i + 4] for i, n in enumerate(rgb_images)]
    ds = load_dataset(str(make_zip(tmp_path / "set.zip", rgb_images, labels)))
    order = sorted(rgb_images)
    assert ds.images.shape == (3, 3, 8, 8)
    for i, name in enumerate(order):
        assert torch.equal(ds.images[i], torch.from_numpy(rgb_images[name]).permute(2, 0, 1))
    assert ds.labels.tolist() == [dict(labels)[n] for n in order] and ds.name == "set"


def test_zip_without_labels_and_grayscale(tmp_path):
    gray = {f"{i}.png": np.full((4, 4), 10 * i, np.uint8) for i in range(3)}
    ds = load_zip(make_zip(tmp_path / "g.zip", gray))
    assert ds.labels is None and ds.images.shape == (3, 1, 4, 4) and ds.images[2].unique().item() == 20
    assert load_zip(make_zip(tmp_path / "n.zip", gray, labels=None)).labels is None


def test_zip_errors(tmp_path, rgb_images):
    partial = [[next(iter(rgb_images)), 1]]
    with pytest.raises(EctuneError, match="has no label for 00000/img00000000.png"):
        load_zip(make_zip(tmp_path / "a.zip", rgb_images, partial))
    with pytest.raises(EctuneError, match="must be"):
        load_zip(make_zip(tmp_path / "b.zip", rgb_images, [["x.png", -1]]))
    mixed = {**rgb_images, "z.png": np.zeros((4, 4, 3), np.uint8)}
    with pytest.raises(EctuneError, match="all images must share size"):
        load_zip(make_zip(tmp_path / "c.zip", mixed))
    with pytest.raises(EctuneError, match="no .* images"):
        load_zip(make_zip(tmp_path / "d.zip", {}))
    (tmp_path / "e.zip").write_bytes(b"not a zip")
    with pytest.raises(EctuneError, match="cannot read .* as a zip"):
        load_dataset(str(tmp_path / "e.zip"))
    with zipfile.ZipFile(tmp_path / "f.zip", "w") as zf:
        zf.writestr("bad.png", b"\x89PNG garbage")
    with pytest.raises(EctuneError, match="cannot read image .*bad.png"):
        load_zip(tmp_path / "f.zip")


def test_empty_spec_is_an_error():
    with pytest.raises(EctuneError, match="no dataset given"):
        load_dataset("")
