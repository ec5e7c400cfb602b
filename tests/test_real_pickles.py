"""Snapshots shaped like the files EDM, official ECT and EDM2 write, read without running their code.

Built here without any EDM/ECT/EDM2 code: numpy scalars and arrays pickled by numpy itself (also
under numpy 1.x's module names, rewritten in the stream), a fake ``dnnlib.util.EasyDict``, EDM's
persistent-class records carrying a ``module_src`` that would create a marker file if executed (the
fixture of test_importers.py), a loss object holding a bound method as ECT's ECMLoss does, and an
EDM2-style EasyDict snapshot with a float16 network. Tampered files are refused and nothing runs.
"""

import collections
import io
import math
import os
import pickle
import pickletools
import re
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz import FUZZ, corrupt
from test_importers import _persistent, edm_snapshot, persistence, tiny_denoiser  # noqa: F401

from ectune.errors import EctuneError
from ectune.importers import (
    PickledArray,
    PickledAttribute,
    PickledModule,
    import_edm_pickle,
    read_edm_pickle,
    snapshot_metadata,
)
from ectune.models import load_denoiser

NUMBERS = [np.float64(np.sqrt(0.5)), np.float32(1.5), np.float16(0.25), np.int64(-3), np.uint8(200), np.bool_(True)]


def numpy1(raw: bytes) -> bytes:
    """`raw` as numpy 1.x writes it: ``numpy._core.*`` names become ``numpy.core.*`` (frames dropped,
    which pickle allows, since the rewritten strings are shorter)."""
    ops = list(pickletools.genops(raw))
    out = bytearray()
    for (op, arg, pos), nxt in zip(ops, [p for _, _, p in ops[1:]] + [len(raw)]):
        if op.name == "FRAME":
            continue
        if op.name == "SHORT_BINUNICODE" and arg.startswith("numpy._core"):
            new = arg.replace("numpy._core", "numpy.core", 1).encode()
            out += pickle.SHORT_BINUNICODE + bytes([len(new)]) + new
        elif op.name == "GLOBAL" and arg.startswith("numpy._core"):
            out += pickle.GLOBAL + arg.replace("numpy._core", "numpy.core", 1).replace(" ", "\n").encode() + b"\n"
        else:
            out += raw[pos:nxt]
    return bytes(out)


def write(path, raw: bytes):
    path.write_bytes(raw)
    return path


def refused(path, match="refusing to load"):
    with pytest.raises(EctuneError, match=match):
        read_edm_pickle(path)


@pytest.fixture
def dnnlib(monkeypatch):
    """A fake ``dnnlib.util`` whose EasyDict pickles under that name, as EDM2's snapshots do."""
    pkg, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict, pkg.util = EasyDict, util
    monkeypatch.setitem(sys.modules, "dnnlib", pkg)
    monkeypatch.setitem(sys.modules, "dnnlib.util", util)
    return util


class _Calls:
    """Pickles as ``func(*args)`` (callable itself, so pickle accepts it as the func of another call)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):
        raise AssertionError("never called")


def record(class_name, module_src, **state):
    """A plain object of class `class_name` pickled as an EDM persistent class, with `state`."""
    obj = _persistent(type(class_name, (), {}), module_src)()
    obj.__dict__.update(state)
    return obj


def persistent(obj, module_src):
    """`obj` (a plain object, or a module and everything below it) as an EDM persistent class."""
    for m in list(obj.modules()) if isinstance(obj, torch.nn.Module) else [obj]:
        if not isinstance(m, torch.nn.ModuleDict):
            m.__class__ = _persistent(type(m), module_src)
    return obj


# --- numpy
@pytest.mark.parametrize("names", ["numpy2", "numpy1"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_scalars_come_back_as_python_numbers(tmp_path, names, protocol):
    raw = pickle.dumps({"values": NUMBERS, "dtype": np.dtype("f4")}, protocol=protocol)
    if names == "numpy1":
        raw = numpy1(raw)
        assert b"numpy.core" in raw and b"numpy._core" not in raw
    got = read_edm_pickle(write(tmp_path / "n.pkl", raw))["values"]
    assert [type(v) for v in got] == [float, float, float, int, int, bool]
    assert got == [v.item() for v in NUMBERS] and got[0] == math.sqrt(0.5)


@pytest.mark.parametrize("names", ["numpy2", "numpy1"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numeric_numpy_arrays_load(tmp_path, names, protocol):
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              np.array([1, -2], dtype=">i4"), np.zeros((0, 4), dtype=np.uint8), np.array(True)]
    raw = pickle.dumps(arrays, protocol=protocol)
    got = read_edm_pickle(write(tmp_path / "a.pkl", numpy1(raw) if names == "numpy1" else raw))
    assert all(isinstance(g, PickledArray) for g in got)
    for g, a in zip(got, arrays):
        assert g.array.dtype == a.dtype and g.array.shape == a.shape and np.array_equal(g.array, a)


@pytest.mark.parametrize("value", [np.array([1, 2], dtype=object), np.array([(1, 2.0)], dtype="i4,f8"),
                                   np.array(["ab"]), np.datetime64("2020-01-01"), np.complex64(1j)])
def test_numpy_values_of_other_dtypes_are_refused(tmp_path, value):
    refused(write(tmp_path / "o.pkl", pickle.dumps({"x": value}, protocol=4)), "numpy dtype")


# --- EDM, ECT and EDM2 snapshot structures
def test_edm_snapshot_with_numpy_settings_and_a_loss_imports_exactly(persistence, tmp_path):
    D = tiny_denoiser()
    snap = edm_snapshot(D, persistence.module.source)
    for block in snap["ema"].modules():                       # EDM's UNetBlocks keep np.sqrt(0.5)
        if hasattr(block, "skip_scale"):
            block.skip_scale = np.float64(np.sqrt(0.5))
            block._init_kwargs = dict(skip_scale=block.skip_scale, init_attn=dict(init_weight=np.sqrt(0.2)))
    snap.update(loss_fn=record("EDMLoss", persistence.module.source, P_mean=-1.2, P_std=1.2, sigma_data=0.5),
                augment_pipe=record("AugmentPipe", persistence.module.source, p=0.12, xflip=1e8, yflip=1.0))
    pkl = write(tmp_path / "net.pkl", pickle.dumps(snap, protocol=4))
    assert b"numpy._core.multiarray" in pkl.read_bytes()

    meta = snapshot_metadata(read_edm_pickle(pkl))
    import_edm_pickle(pkl, tmp_path / "m.safetensors")
    assert not persistence.sentinel.exists()
    assert meta["loss_fn"] == {"class_name": "EDMLoss", "settings": dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)}
    assert meta["augment_pipe"]["settings"]["xflip"] == 1e8
    assert meta["dataset_kwargs"] == {"path": "cifar10.zip", "xflip": False}
    assert meta["network"]["class_name"] == "EDMPrecond" and meta["network"]["inner"]["class_name"] == "SongUNet"
    imported, _ = load_denoiser(tmp_path / "m.safetensors")
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 5.0])
    with torch.no_grad():
        assert torch.equal(imported(x, sigma), D(x, sigma))


class ECMLoss:
    """ECT's loss keeps the chosen schedule as a bound method, ``self.t_to_r = self.t_to_r_sigmoid``."""

    def __init__(self):
        self.P_mean, self.P_std, self.q, self.k, self.b, self.c = -1.1, 2.0, 2.0, 8.0, 1.0, 0.0
        self.t_to_r = self.t_to_r_sigmoid
        self._init_kwargs = dict(P_mean=-1.1, P_std=2.0, adj="sigmoid")

    def t_to_r_sigmoid(self, t):
        return t


def test_a_loss_holding_a_bound_method_loads_as_inert_records(persistence, tmp_path):
    snap = edm_snapshot(tiny_denoiser(), persistence.module.source)
    snap["ema"].__class__.__name__ = "ECMPrecond"
    snap["loss_fn"] = persistent(ECMLoss(), persistence.module.source)
    raw = pickle.dumps(snap, protocol=4)
    assert b"builtins" in raw and b"getattr" in raw                 # getattr(loss, "t_to_r_sigmoid")

    got = read_edm_pickle(write(tmp_path / "ect.pkl", raw))
    assert not persistence.sentinel.exists()
    loss = got["loss_fn"]
    assert isinstance(loss, PickledModule) and loss.class_name == "ECMLoss"
    assert isinstance(loss.state["t_to_r"], PickledAttribute) and loss.state["t_to_r"].name == "t_to_r_sigmoid"
    settings = snapshot_metadata(got)["loss_fn"]["settings"]
    assert settings == dict(P_mean=-1.1, P_std=2.0, q=2.0, k=8.0, b=1.0, c=0.0,
                            t_to_r={"method": "t_to_r_sigmoid", "of": "ECMLoss"})
    with pytest.raises(EctuneError, match="ECMLoss.t_to_r_sigmoid"):
        loss.state["t_to_r"](1.0)


class UNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.ModuleDict({"8x8_conv": torch.nn.Conv2d(4, 8, 3)})
        self.out_gain = torch.nn.Parameter(torch.tensor(0.3))
        self.res_balance = 0.3


class Precond(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.unet, self.logvar_linear = UNet(), torch.nn.Linear(8, 1)
        self.sigma_data, self.use_fp16 = 0.5, True
        self._init_kwargs = dict(img_resolution=8, img_channels=4, label_dim=1000, model_channels=8,
                                 attn_balance=np.float64(0.3))


def test_edm2_easydict_snapshot_with_float16_network(persistence, dnnlib, tmp_path):
    src = persistence.module.source
    net = persistent(Precond(), src).eval().requires_grad_(False).to(torch.float16)
    encoder = record("StabilityVAEEncoder", src, scale=np.float32([0.5, 0.25]), bias=np.float32([0.0, 1.0]),
                     batch_size=8)
    data = dnnlib.EasyDict(encoder=encoder, loss_fn=record("EDM2Loss", src, P_mean=-0.8, P_std=1.6, sigma_data=0.5),
        dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="in64.zip"))
    data.update(ema=net)
    raw = pickle.dumps(data, protocol=4)
    assert b"dnnlib.util" in raw and b"EasyDict" in raw

    got = read_edm_pickle(write(tmp_path / "edm2.pkl", raw))
    assert not persistence.sentinel.exists() and isinstance(got, dict) and not hasattr(got, "ema")
    tensors = got["ema"].named_tensors()
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert torch.equal(tensors["unet.enc.8x8_conv.weight"], net.unet.enc["8x8_conv"].weight)
    meta = snapshot_metadata(got)
    assert meta["easydict"] and meta["keys"] == ["dataset_kwargs", "ema", "encoder", "loss_fn"]
    assert meta["network"]["init_kwargs"]["attn_balance"] == 0.3 and meta["network"]["dtypes"] == ["float16"]
    assert meta["network"]["inner"]["settings"] == {"res_balance": 0.3}
    assert meta["encoder"]["settings"] == {"scale": [0.5, 0.25], "bias": [0.0, 1.0], "batch_size": 8}
    assert meta["loss_fn"]["settings"] == dict(P_mean=-0.8, P_std=1.6, sigma_data=0.5)
    assert meta["dataset_kwargs"]["path"] == "in64.zip"


# --- tampered files
def _global(module: str, name: str, *args_ops: bytes) -> bytes:
    """A protocol-2 pickle that calls module.name with the given pushed arguments."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(" + b"".join(args_ops) + b"tR."


def _text(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + len(b).to_bytes(4, "little") + b


def _getattr_call(owner, name, *args):
    """getattr(owner, name)(*args) as pickle writes a call of a bound method."""
    return _Calls(_Calls(getattr, owner, name), *args)


def _evil_cases(persistence, tmp_path, dnnlib):
    target = tmp_path / "pwned"
    src = persistence.module.source
    owner = record("EDMLoss", src, P_mean=-1.2)
    return target, {
        "posix.system": (_global("posix", "system", _text(f"touch {target}")), "import posix.system"),
        "os.system": (_Calls(os.system, f"touch {target}"), "import (posix|nt).system"),
        "builtins.eval": (_Calls(eval, f"open({str(target)!r}, 'w').close()"), "import builtins.eval"),
        "getattr-then-call": (_getattr_call(owner, "run", f"touch {target}"), r"calls EDMLoss.run\("),
        "getattr-on-a-global": (_Calls(getattr, collections.OrderedDict, "fromkeys"), "calls getattr"),
        "getattr-dunder": (_Calls(getattr, owner, "__class__"), "calls getattr"),
        "state-holds-a-function": (record("EDMLoss", src, hook=torch._utils._rebuild_tensor_v2), "not data"),
        "state-holds-a-class": (record("EDMLoss", src, hook=collections.OrderedDict), "not data"),
        "dtype-wrong-args": (_Calls(np.dtype, "f8", "yes", 3), "numpy dtype"),
        "scalar-wrong-bytes": (_Calls(np._core.multiarray.scalar, np.dtype("f8"), b"\x00"), "numpy scalar"),
        "scalar-object-dtype": (_Calls(np._core.multiarray.scalar, np.dtype("O")), r"numpy dtype\('O8'"),
        "easydict-args": (_Calls(dnnlib.EasyDict, {"a": 1}), "EasyDict with arguments"),
        "persistent-not-a-record": (_Calls(persistence.module._reconstruct_persistent_obj, 123), "malformed EDM"),
        "reconstruct-other-class": (_Calls(np._core.multiarray._reconstruct, set, (0,), b"b"), "numpy array"),
    }


@pytest.mark.parametrize("case", ["posix.system", "os.system", "builtins.eval", "getattr-then-call",
                                  "getattr-on-a-global", "getattr-dunder", "state-holds-a-function",
                                  "state-holds-a-class", "dtype-wrong-args", "scalar-wrong-bytes",
                                  "scalar-object-dtype", "easydict-args", "persistent-not-a-record",
                                  "reconstruct-other-class"])
def test_tampered_snapshots_are_refused_and_nothing_runs(persistence, dnnlib, tmp_path, case):
    target, cases = _evil_cases(persistence, tmp_path, dnnlib)
    payload, why = cases[case]
    raw = payload if isinstance(payload, bytes) else pickle.dumps({"ema": None, "loss_fn": payload}, protocol=4)
    with pytest.raises(EctuneError, match=f"refusing to load {re.escape(str(tmp_path))}.*: .*{why}"):
        read_edm_pickle(write(tmp_path / "evil.pkl", raw))
    assert not target.exists() and not persistence.sentinel.exists()


def test_persistent_ids_are_refused(tmp_path):
    class WithIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage-0" if isinstance(obj, str) and obj == "x" else None

    buf = io.BytesIO()
    WithIds(buf, protocol=4).dump({"a": "x"})
    refused(write(tmp_path / "p.pkl", buf.getvalue()), "persistent ids")


def test_a_module_that_contains_itself_is_refused(persistence, tmp_path):
    net = persistent(torch.nn.Sequential(torch.nn.Linear(2, 2)), persistence.module.source)
    net._modules["loop"] = net
    refused(write(tmp_path / "c.pkl", pickle.dumps({"ema": net}, protocol=4)), "contains itself")
    assert not persistence.sentinel.exists()


# --- fuzz: a mutated snapshot loads (and describes itself) or raises EctuneError, nothing else
@pytest.fixture(scope="module")
def seed_snapshot() -> bytes:
    """A small EDM2-like snapshot with every kind of record above, pickled with fake dnnlib /
    torch_utils modules put in sys.modules only while pickling."""
    fakes = {n: types.ModuleType(n) for n in ("dnnlib", "dnnlib.util", "torch_utils", "torch_utils.persistence")}

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never loaded with pickle")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fakes["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    easydict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    fakes["dnnlib.util"].EasyDict = easydict
    saved = {n: sys.modules.get(n) for n in fakes}
    sys.modules.update(fakes)
    try:
        net = persistent(Precond(), "x = 1").eval().requires_grad_(False).to(torch.float16)
        loss = persistent(ECMLoss(), "x = 1")
        snap = easydict(ema=net, loss_fn=loss, encoder=record("E", "x = 1", scale=np.float32([0.5, 0.25])),
                        dataset_kwargs=easydict(path="x.zip", resolution=np.int64(8)))
        return pickle.dumps(snap, protocol=4)
    finally:
        for n, m in saved.items():
            sys.modules.pop(n) if m is None else sys.modules.__setitem__(n, m)


def test_the_fuzz_seed_loads(seed_snapshot, tmp_path):
    meta = snapshot_metadata(read_edm_pickle(write(tmp_path / "s.pkl", seed_snapshot)))
    assert meta["dataset_kwargs"]["resolution"] == 8 and meta["loss_fn"]["settings"]["P_mean"] == -1.1


@FUZZ
@given(st.data())
def test_mutated_snapshots_load_or_are_refused(seed_snapshot, tmp_path_factory, d):
    path = tmp_path_factory.mktemp("fuzz") / "m.pkl"
    path.write_bytes(d.draw(corrupt(seed_snapshot)))
    try:
        snapshot_metadata(read_edm_pickle(path))
    except EctuneError:
        pass
