"""The records :class:`.pickles.SafeUnpickler` builds in place of a snapshot's objects: data only.

:class:`PickledModule` keeps a persistent object's or torch container's class name and state,
:class:`PickledAttribute` a pickled bound method's owner and name, :class:`SnapshotDict` an EasyDict's
items; numpy dtypes, scalars and arrays of plain number types are decoded with ``np.frombuffer``.
Each stand-in checks what the pickle hands it and raises :class:`Refused` for anything else.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import EctuneError


class Refused(EctuneError):
    """A record a stand-in will not rebuild; the reader names the file."""


class PickledModule:
    """What is kept of a pickled persistent object (a network module, loss, augment pipe, encoder) or
    torch container: its class name and state — never its code.

    ``state`` is the object's ``__dict__`` as pickled: for modules ``_parameters``, ``_buffers``,
    ``_modules`` (children, themselves PickledModules) and plain attributes; for EDM's persistent
    classes also ``_init_kwargs`` (the constructor's keyword arguments). ``module`` is the module
    named by the pickle (torch containers); EDM's records carry only the source, which is dropped.
    """

    class_name = "?"
    module: str | None = None
    state: dict | None = None

    def __init__(self, class_name: str, state: dict, module: str | None = None):
        self.class_name, self.state, self.module = class_name, state, module

    def __setstate__(self, state: Any) -> None:        # pickle's BUILD for plain torch containers
        if not isinstance(state, dict):
            raise Refused(f"pickled {self.class_name} has a {type(state).__name__} state, expected a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"PickledModule({self.class_name})"

    @property
    def is_module(self) -> bool:
        return "_modules" in (self.state or {})

    @property
    def init_kwargs(self) -> dict:
        kwargs = (self.state or {}).get("_init_kwargs")
        return dict(kwargs) if isinstance(kwargs, dict) else {}

    def _entries(self, key: str) -> dict:
        value = (self.state or {}).get(key) or {}
        if not isinstance(value, dict):
            raise EctuneError(f"pickled {self.class_name}.{key} is a {type(value).__name__}, expected a dict")
        return {k: v for k, v in value.items() if v is not None}

    @property
    def children(self) -> dict[str, PickledModule]:
        kids = self._entries("_modules")
        bad = [k for k, v in kids.items() if not isinstance(v, PickledModule)]
        if bad:
            raise EctuneError(f"pickled {self.class_name} has non-module children {bad}; not a network snapshot")
        return kids

    def named_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Parameters and buffers of this module and all below it, by dotted name (a state_dict)."""
        out = {}
        for key in ("_parameters", "_buffers"):
            for name, value in self._entries(key).items():
                if not isinstance(value, torch.Tensor):
                    raise EctuneError(f"pickled {prefix}{name} is a {type(value).__name__}, not a tensor")
                out[prefix + name] = value
        for name, child in self.children.items():
            out.update(child.named_tensors(f"{prefix}{name}."))
        return out

    def find(self, path: str) -> PickledModule | None:
        """The submodule at a dotted `path` ("" = self), or None."""
        node = self
        for part in filter(None, path.split(".")):
            node = node.children.get(part)
            if node is None:
                return None
        return node

    def class_names(self) -> set[str]:
        return {self.class_name}.union(*(c.class_names() for c in self.children.values()))


class PickledAttribute:
    """A bound method as pickled, ``getattr(owner, name)`` (ECT's ECMLoss keeps ``self.t_to_r``):
    the owner's class name and the attribute name. Nothing is looked up; calling it is refused."""

    def __init__(self, owner: str, name: str):
        self.owner, self.name = owner, name

    def __repr__(self) -> str:
        return f"PickledAttribute({self.owner}.{self.name})"

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise Refused(f"it calls {self.owner}.{self.name}(...), which would run code")


class SnapshotDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a plain dict (pickle fills it item by item)."""

    def __init__(self, *args: Any, **kwargs: Any):
        if args or kwargs:
            raise Refused("it calls dnnlib.util.EasyDict with arguments")
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if state:
            raise Refused("it gives a dnnlib.util.EasyDict object state")


# --- numpy: scalars and arrays of plain number types, decoded with np.frombuffer
_NUMERIC = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"}


class PickledDType:
    """Stand-in for ``numpy.dtype(spec, align, copy)`` + its pickled state: bool/int/uint/float only."""

    spec: str | None = None
    order = "="

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True):
        if spec not in _NUMERIC or not isinstance(align, bool) or not isinstance(copy, bool):
            raise Refused(f"it holds a numpy dtype{(spec, align, copy)!r:.60}; only bool/int/uint/float dtypes "
                          "are read")
        self.spec = spec

    def __setstate__(self, state: Any) -> None:
        ok = (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
              and isinstance(state[1], str) and len(state[1]) == 1 and state[1] in "<>|="
              and state[2:8] == (None, None, None, -1, -1, 0) and (len(state) == 8 or state[8] is None))
        if not ok:
            raise Refused(f"it holds a numpy dtype with state {str(state)[:80]}; only plain number dtypes are read")
        self.order = state[1]

    @property
    def numpy(self) -> np.dtype:
        if self.spec not in _NUMERIC:
            raise Refused("it holds a numpy dtype that was never given a type")
        return np.dtype(self.order + self.spec)           # built from the two checked strings only


def numpy_scalar(dtype: Any, data: Any = None) -> bool | int | float:
    """``numpy.core.multiarray.scalar(dtype, bytes)`` → the Python number."""
    if not isinstance(dtype, PickledDType) or not isinstance(data, bytes) or len(data) != dtype.numpy.itemsize:
        raise Refused("it holds a malformed numpy scalar (expected a number dtype and its bytes)")
    return np.frombuffer(data, dtype=dtype.numpy)[0].item()


class PickledArray:
    """A numeric numpy array from the pickle, rebuilt with ``np.frombuffer``: ``.array``."""

    array: np.ndarray | None = None

    def __init__(self, *args: Any):
        if args:
            raise Refused("it calls numpy.ndarray with arguments")

    def __setstate__(self, state: Any) -> None:
        ok = (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and is_int_tuple(state[1])
              and isinstance(state[3], bool) and isinstance(state[4], bytes))
        if not ok:
            raise Refused("it holds a malformed numpy array record")
        self.array = _array(state[4], state[2], tuple(state[1]), "F" if state[3] else "C")

    def __repr__(self) -> str:
        return f"PickledArray({self.array!r})"


def _array(raw: bytes, dtype: Any, shape: tuple, order: str) -> np.ndarray:
    if not isinstance(dtype, PickledDType) or len(raw) != math.prod(shape) * dtype.numpy.itemsize:
        raise Refused("it holds a numpy array whose dtype or size does not match its bytes")
    return np.frombuffer(raw, dtype=dtype.numpy).reshape(shape, order=order).copy()


def numpy_reconstruct(cls: Any, shape: Any, typecode: Any) -> PickledArray:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``: an empty array BUILD then fills."""
    if cls is not PickledArray or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise Refused("it holds a malformed numpy array record")
    return PickledArray()


def numpy_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> PickledArray:
    """``numpy.core.numeric._frombuffer`` (pickle protocol 5, in-band buffer)."""
    if not (isinstance(buf, (bytes, bytearray)) and is_int_tuple(shape) and order in ("C", "F")):
        raise Refused("it holds a malformed numpy array record")
    out = PickledArray()
    out.array = _array(bytes(buf), dtype, tuple(shape), order)
    return out


def is_int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(v, int) and v >= 0 for v in value)
