"""Readers never trust a file: on random or mutated bytes each either loads or raises EctuneError.

Property-based (hypothesis): real files of every kind ectune reads — a tiny checkpoint's
model.safetensors and train_state.pt, a run's config.json, an .npz dataset, a PNG in an image
folder, an EDM-style zip, IDX files raw and gzipped — are mutated (bytes flipped, inserted, deleted,
cut short, spliced) or replaced by random bytes, and fed to the reader. Anything but success or
EctuneError (a KeyError, a UnicodeDecodeError, a numpy or torch exception, ...) fails the test.
Also: no source file can load a pickle that runs code.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ectune import data
from ectune.checkpoint import read_train_state, read_weights, save_checkpoint
from ectune.config import RunConfig, read_config
from ectune.errors import EctuneError
from ectune.models import build_denoiser
from ectune.presets import preset

# The same 60 examples per reader on every run; ECTUNE_FUZZ_EXAMPLES=5000 searches further, at random.
_EXAMPLES = int(os.environ.get("ECTUNE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXAMPLES or 60, derandomize=not _EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])



@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with 1-4 random edits; positions shrink towards the start, where the headers are."""
    b = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(b) - 1, 0)))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "splice"]))
        if op == "flip" and b:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and b:
            b[i] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, ord('"'), ord("{"), ord("9")]))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[i:i + draw(st.integers(1, 16))]
        elif op == "cut":
            del b[i:]
        elif op == "splice":                                   # a chunk copied from elsewhere in the file
            j = draw(st.integers(0, max(len(b) - 1, 0)))
            b[i:i + 8] = b[j:j + 8]
    return bytes(b)


def corrupt(seed: bytes):
    return st.one_of(mutated(seed), st.binary(max_size=600))


def _loads_or_refuses(read, *args) -> None:
    try:
        read(*args)
    except EctuneError:
        pass


# --- seeds: one real file of each kind
@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("seeds")
    cfg = preset("tiny", "pretrain")
    cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, model_channels=4, img_resolution=8))
    D = build_denoiser(cfg.net)
    opt = torch.optim.Adam(D.parameters())
    D(torch.zeros(1, 1, 8, 8), torch.ones(1)).sum().backward()
    opt.step()
    tensors = {f"{w}.{k}": v.clone() for w in ("net", "ema") for k, v in D.state_dict().items()}
    state = {"step": 1, "optimizer": opt.state_dict(), "sampler": {"n": 4, "seed": 0, "batch_size": 2, "position": 2},
             "gen": torch.Generator().get_state(), "cpu_rng": torch.get_rng_state(), "nonfinite_total": 0}
    ckpt = save_checkpoint(root, 1, cfg, tensors, state)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    npz, png, zipped = io.BytesIO(), io.BytesIO(), io.BytesIO()
    np.savez(npz, images=images, labels=np.arange(3))
    Image.fromarray(images[0]).save(png, format="PNG")
    with zipfile.ZipFile(zipped, "w") as z:
        for i, im in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            z.writestr(f"img{i}.png", buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[f"img{i}.png", i] for i in range(3)]}))
    idx = b"\0\0\x08\x03" + struct.pack(">3I", 3, 8, 8) + images.tobytes()
    return {"weights": (ckpt / "model.safetensors").read_bytes(), "state": (ckpt / "train_state.pt").read_bytes(),
            "config": cfg.to_json().encode(), "npz": npz.getvalue(), "png": png.getvalue(), "zip": zipped.getvalue(),
            "idx": idx, "idx.gz": gzip.compress(idx)}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_the_seeds_load(seeds, work):
    """Unmutated, every seed file reads: the mutations below start from valid files."""
    for name, raw in seeds.items():
        (work / name).write_bytes(raw)
    assert read_weights(work / "weights")[0].net.model_channels == 4
    (work / "train_state.pt").write_bytes(seeds["state"])
    assert read_train_state(work)["step"] == 1
    assert read_config(work / "config") == RunConfig.from_dict(json.loads(seeds["config"]))
    assert len(data.load_npz(work / "npz")) == 3
    assert data.read_idx(work / "idx").shape == data.read_idx(work / "idx.gz").shape == (3, 8, 8)
    assert len(data.load_zip(work / "zip")) == 3


# --- the readers on corrupt bytes
@FUZZ
@given(st.data())
def test_weights_reader(seeds, work, d):
    (work / "model.safetensors").write_bytes(d.draw(corrupt(seeds["weights"])))
    _loads_or_refuses(read_weights, work / "model.safetensors")


@FUZZ
@given(st.data())
def test_train_state_reader(seeds, work, d):
    (work / "train_state.pt").write_bytes(d.draw(corrupt(seeds["state"])))
    _loads_or_refuses(read_train_state, work)


@FUZZ
@given(st.data())
def test_config_reader(seeds, work, d):
    (work / "config.json").write_bytes(d.draw(corrupt(seeds["config"])))
    _loads_or_refuses(read_config, work / "config.json")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@FUZZ
@given(st.data())
def test_config_reader_on_wrong_values(seeds, work, d):
    """Valid JSON with one field (or section) replaced by an arbitrary JSON value."""
    cfg = json.loads(seeds["config"])
    section = d.draw(st.sampled_from(sorted(cfg)))
    node, key = (cfg[section], d.draw(st.sampled_from(sorted(cfg[section])))) if isinstance(cfg[section], dict) \
        else (cfg, section)
    node[key] = d.draw(_json)
    (work / "config.json").write_text(json.dumps(cfg))
    _loads_or_refuses(read_config, work / "config.json")


@FUZZ
@given(st.data(), st.sampled_from(["npz", "zip"]))
def test_npz_and_zip_readers(seeds, work, d, kind):
    (work / f"data.{kind}").write_bytes(d.draw(corrupt(seeds[kind])))
    _loads_or_refuses(data.load_dataset, str(work / f"data.{kind}"))


@FUZZ
@given(st.data())
def test_image_folder_reader(seeds, work, d):
    folder = work / "images"
    folder.mkdir(exist_ok=True)
    (folder / "a.png").write_bytes(seeds["png"])
    (folder / "b.png").write_bytes(d.draw(corrupt(seeds["png"])))
    _loads_or_refuses(data.load_image_folder, folder)


@FUZZ
@given(st.data(), st.sampled_from(["idx", "idx.gz"]))
def test_idx_reader(seeds, work, d, kind):
    (work / "file-idx3-ubyte").write_bytes(d.draw(corrupt(seeds[kind])))
    _loads_or_refuses(data.read_idx, work / "file-idx3-ubyte")


# --- no loader that runs code
_SRC = Path(__file__).resolve().parents[1] / "src" / "ectune"
_UNSAFE_CALLS = {"pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "dill.load", "dill.loads",
                 "joblib.load", "shelve.open", "yaml.load", "yaml.unsafe_load", "eval", "exec"}
# TorchScript runs the program stored in its file: allowed only here, for the FID Inception network,
# whose module says to load only trusted files and whose cache is keyed by the file's sha256.
_JIT_LOAD_ALLOWED = {"metrics/inception.py"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function: `torch.load`, `np.load`, `pickle.Unpickler`, ..."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def _unsafe_loads(source: str, rel: str) -> list[str]:
    """Calls in `source` (file `rel` under src/ectune) that could run code stored in a file."""
    found = []
    for node in sorted(ast.walk(ast.parse(source)), key=lambda n: getattr(n, "lineno", 0)):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            f = _name(node.func)
            if f == "torch.load" and not _keyword_is(node, "weights_only", True):
                found.append(f"{where} torch.load without weights_only=True")
            if f in _UNSAFE_CALLS:
                found.append(f"{where} {f}")
            if f in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords) \
                    and not _keyword_is(node, "allow_pickle", False):
                found.append(f"{where} {f} with allow_pickle")
            if f.endswith("from_pretrained") and not _keyword_is(node, "use_safetensors", True):
                found.append(f"{where} {f} without use_safetensors=True")
            if f == "torch.jit.load" and rel not in _JIT_LOAD_ALLOWED:
                found.append(f"{where} torch.jit.load")
        if isinstance(node, ast.ClassDef) and any(_name(b).endswith("Unpickler") for b in node.bases):
            methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            if "find_class" not in methods:
                found.append(f"{where} Unpickler subclass {node.name} without a restricting find_class")
    return found


def test_no_source_file_loads_a_pickle_that_runs_code():
    files = sorted(_SRC.rglob("*.py"))
    assert len(files) > 10
    hits = [h for f in files for h in _unsafe_loads(f.read_text(encoding="utf-8"), f.relative_to(_SRC).as_posix())]
    assert hits == []


def test_the_source_check_finds_unsafe_loads():
    source = ("import pickle, torch, numpy as np\n"
              "a = torch.load('x')\nb = torch.load('x', weights_only=False)\nc = pickle.loads(b'')\n"
              "d = np.load('x', allow_pickle=True)\nclass U(pickle.Unpickler):\n    pass\n"
              "e = torch.jit.load('x')\n"
              "ok = torch.load('x', weights_only=True), np.load('x'), np.load('x', allow_pickle=False)\n")
    lines = [h.split(" ", 1)[0] for h in _unsafe_loads(source, "probe.py")]
    assert lines == [f"probe.py:{i}" for i in (2, 3, 4, 5, 6, 8)]
