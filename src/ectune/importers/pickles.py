"""Read EDM / ECT / EDM2 snapshot pickles as data, without running any code they carry.

EDM (Karras et al. 2022), EDM2 (Karras et al. 2024) and the official ECT code save training
snapshots with ``pickle.dump``: EDM and ECT a ``dict(ema=net, loss_fn=..., augment_pipe=...,
dataset_kwargs=...)`` (ECT's ``imgnet`` branch just ``dict(ema=net)``), EDM2 a
``dnnlib.util.EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=net)`` with the network in
float16. Every network module, loss object, augment pipe and encoder is a "persistent class": its
pickle calls ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where
``meta["module_src"]`` is the *source code* of its module, which their loader executes. A plain
``pickle.load`` runs whatever that source, or any other global the file names, says.

:class:`SafeUnpickler` resolves only these globals, each to a stand-in that builds data:

    collections.OrderedDict, builtins set/frozenset           plain containers
    _codecs.encode                                            latin-1 bytes (protocol-2 pickles)
    torch._utils._rebuild_tensor(_v2), _rebuild_parameter*    our own validated tensor rebuild
    torch.storage._load_from_bytes                            torch.load(..., weights_only=True)
    torch_utils.persistence._reconstruct_persistent_obj       PickledModule(class name, state); the source is dropped
    torch.nn ModuleDict / ModuleList / Sequential             PickledModule as well
    dnnlib.util.EasyDict                                      SnapshotDict, a plain dict
    builtins.getattr (a pickled bound method)                 PickledAttribute(owner class, name): never looked up
    numpy(._core|.core).multiarray.scalar + numpy.dtype       a Python bool/int/float (bool/int/uint/float only)
    numpy ndarray (_reconstruct / _frombuffer)                PickledArray: np.frombuffer of a numeric dtype

Anything else raises EctuneError naming the global, and so does a loaded tree holding anything but
data (a function, a class, a callable smuggled into a state). The stand-ins' types are in
:mod:`.records`; :mod:`.metadata` describes the tree.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import EctuneError
from .records import (
    PickledArray,
    PickledAttribute,
    PickledDType,
    PickledModule,
    Refused,
    SnapshotDict,
    is_int_tuple,
    numpy_frombuffer,
    numpy_reconstruct,
    numpy_scalar,
)


# --- torch tensors and EDM's persistent objects
def _persistent_object(meta: Any) -> PickledModule:
    """Stand-in for EDM's ``_reconstruct_persistent_obj``: class name and state; the source is dropped."""
    if not (isinstance(meta, dict) and meta.get("type", "class") == "class"
            and isinstance(meta.get("class_name"), str) and isinstance(meta.get("state"), dict)):
        raise Refused("it holds a malformed EDM persistent object (expected meta with class_name and a state dict)")
    meta.pop("module_src", None)                         # never looked at
    return PickledModule(meta["class_name"], meta["state"])


def _getattr(owner: Any, name: Any) -> PickledAttribute:
    """``builtins.getattr`` as a pickled bound method uses it, on a pickled object only."""
    if not (isinstance(owner, PickledModule) and isinstance(name, str) and name.isidentifier()
            and not name.startswith("__")):
        raise Refused(f"it calls getattr({type(owner).__name__}, {str(name)[:40]!r}), which is not a method "
                      "of a pickled object")
    return PickledAttribute(owner.class_name, name)


def _container(name: str) -> type:
    """A PickledModule subclass that pickle may instantiate (NEWOBJ) for a plain torch container."""
    return type(name, (PickledModule,), {"class_name": name, "module": "torch.nn.modules.container"})


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """A tensor view of `storage`; requires_grad, backward hooks and metadata are dropped."""
    ok = isinstance(storage, torch.storage.TypedStorage) and isinstance(storage_offset, int) and storage_offset >= 0
    if not (ok and is_int_tuple(size) and is_int_tuple(stride) and len(size) == len(stride)):
        raise Refused("it holds a malformed tensor record (storage, offset, size, stride)")
    try:
        empty = torch.empty((0,), dtype=storage.dtype)
        return empty.set_(storage._untyped_storage, storage_offset, tuple(size), tuple(stride))
    except RuntimeError as e:
        raise Refused(f"a tensor in it lies outside its storage ({e})") from None


def _rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    """A parameter becomes its plain data tensor (its hooks and state are dropped)."""
    if not isinstance(data, torch.Tensor):
        raise Refused(f"it holds a malformed parameter record ({type(data).__name__})")
    return data


def _storage_from_bytes(data: Any) -> torch.storage.TypedStorage:
    """``torch.storage._load_from_bytes`` with ``weights_only=True``: storages, never objects."""
    if not isinstance(data, bytes):
        raise Refused("it holds a malformed storage record (expected bytes)")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad or unsafe record
        raise Refused(f"a tensor storage in it is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise Refused(f"a storage record in it holds a {type(storage).__name__}")
    return storage


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as protocol-2 pickles write an empty bytes object (no arguments: no sizes to allocate)."""
    if args:
        raise Refused("it calls bytes with arguments")
    return b""


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused("it holds a malformed bytes record")
    return text.encode("latin1")


_NUMPY = {"scalar": numpy_scalar, "_reconstruct": numpy_reconstruct}
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "getattr"): _getattr,
    ("builtins", "bytes"): _empty_bytes,
    ("_codecs", "encode"): _latin1_bytes,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("dnnlib.util", "EasyDict"): SnapshotDict,
    ("numpy", "dtype"): PickledDType,
    ("numpy", "ndarray"): PickledArray,
    **{(f"numpy.{core}.multiarray", n): f for core in ("core", "_core") for n, f in _NUMPY.items()},
    **{(f"numpy.{core}.numeric", "_frombuffer"): numpy_frombuffer for core in ("core", "_core")},
    **{("torch.nn.modules.container", n): _container(n) for n in ("ModuleDict", "ModuleList", "Sequential")},
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; any other global raises EctuneError."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module      # protocol-2 pickles' name for it
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise EctuneError(f"refusing to load {self.source}: it would import {module}.{name}, which could run "
                              "code; only tensors and EDM/ECT/EDM2 network snapshots are read") from None

    def persistent_load(self, pid: Any) -> Any:
        raise EctuneError(f"refusing to load {self.source}: it uses persistent ids (a torch.save file?); "
                          "only plain pickles of EDM/ECT/EDM2 snapshots are read")


_DATA = (str, bytes, bytearray, bool, int, float, complex, type(None), torch.Tensor, PickledAttribute, PickledDType)


def check_inert(root: Any) -> None:
    """Refuse a loaded tree that holds anything but data: containers, numbers, strings, tensors and
    the stand-ins above (a function or class left in a state by the pickle, for one), or a module
    that contains itself."""
    seen, todo, modules = set(), [root], []
    while todo:
        obj = todo.pop()
        if isinstance(obj, _DATA) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            todo += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo += list(obj)
        elif isinstance(obj, PickledModule):
            todo.append(obj.state)
            modules.append(obj)
        elif not (isinstance(obj, PickledArray) and isinstance(obj.array, np.ndarray)):
            raise Refused(f"it holds a {type(obj).__name__} ({str(obj)[:60]}), which is not data")
    _refuse_cycles(modules)


def _kids(module: PickledModule) -> list[PickledModule]:
    kids = (module.state or {}).get("_modules")
    return [k for k in kids.values() if isinstance(k, PickledModule)] if isinstance(kids, dict) else []


def _refuse_cycles(modules: list[PickledModule]) -> None:
    """Depth-first over ``_modules``: a module below itself would make every tree walk endless."""
    done: set[int] = set()
    for start in (m for m in modules if id(m) not in done):
        path, stack = {id(start)}, [(start, iter(_kids(start)))]
        while stack:
            node, kids = stack[-1]
            kid = next(kids, None)
            if kid is None:
                stack.pop()
                path.discard(id(node))
                done.add(id(node))
            elif id(kid) in path:
                raise Refused(f"its module {kid.class_name} contains itself")
            elif id(kid) not in done:
                path.add(id(kid))
                stack.append((kid, iter(_kids(kid))))


def read_edm_pickle(path: str | Path) -> Any:
    """Unpickle an EDM/ECT/EDM2 snapshot with :class:`SafeUnpickler` (no code from the file runs)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = SafeUnpickler(f, str(path)).load()
        check_inert(obj)
        return obj
    except Refused as e:
        raise EctuneError(f"refusing to load {path}: {e}") from None
    except EctuneError:
        raise
    except OSError as e:
        raise EctuneError(f"cannot read {path}: {e}; check the path") from None
    except Exception as e:  # a truncated or malformed pickle raises many types
        raise EctuneError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from None
