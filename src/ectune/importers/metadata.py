"""What an unpickled EDM / ECT / EDM2 snapshot says about itself, as JSON data.

:func:`snapshot_metadata` reports the network (class names, ``_init_kwargs``, plain settings such as
``sigma_data`` / ``sigma_min``, tensor count, parameters, dtypes), the snapshot's ``dataset_kwargs``,
and the loss, augment pipe and encoder objects (class name and plain-number settings: ``P_mean``,
``P_std``, ``q``, ``k``, ``b``, ``c``, ...). numpy scalars are already Python numbers; numpy arrays
become lists, bound methods ``{"method": name, "of": class}``, non-finite floats strings ("inf").
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import EctuneError
from .records import PickledArray, PickledAttribute, PickledModule, SnapshotDict


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON data: numbers (non-finite floats as strings), strings, lists, dicts; objects by name."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PickledArray):
        return _jsonable(value.array.tolist(), depth)
    if isinstance(value, PickledAttribute):
        return {"method": value.name, "of": value.owner}
    if isinstance(value, PickledModule):
        return {"class_name": value.class_name}
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if depth < 8 and isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if depth < 8 and isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


def _settings(obj: PickledModule) -> dict:
    """An object's own plain attributes (numbers, strings, lists of them, arrays, bound methods)."""
    state = obj.state or {}
    return {k: _jsonable(v) for k, v in state.items() if not k.startswith("_") and k != "training"
            and not isinstance(v, (PickledModule, torch.Tensor, dict))}


def _object_metadata(obj: PickledModule) -> dict:
    out = {"class_name": obj.class_name, "settings": _settings(obj)}
    if obj.init_kwargs:
        out["init_kwargs"] = _jsonable(obj.init_kwargs)
    return out


def _network_metadata(net: PickledModule) -> dict:
    out = _object_metadata(net)
    inner = next((net.children[k] for k in ("model", "unet") if k in net.children), None)
    if inner is not None:
        out["inner"] = _object_metadata(inner)
    tensors = net.named_tensors()
    out["classes"] = sorted(net.class_names())
    out["tensors"] = len(tensors)
    out["params"] = sum(t.numel() for t in tensors.values())
    out["dtypes"] = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    return out


def precond_parts(precond: PickledModule, inner: str) -> tuple[PickledModule, dict, Any]:
    """A pickled preconditioner's network ``precond.<inner>``, the constructor kwargs of both (the
    network's win) and its sigma_data as found (attribute, else kwarg, else EDM's 0.5), unchecked."""
    net = precond.children[inner]
    kw = {**precond.init_kwargs, **net.init_kwargs}
    return net, kw, precond.state.get("sigma_data", kw.get("sigma_data", 0.5))


def snapshot_metadata(snapshot: Any) -> dict:
    """What an unpickled snapshot says about itself, as JSON data: the network's classes, constructor
    arguments and settings; ``dataset_kwargs``; the loss, augment pipe and encoder (class and settings)."""
    if isinstance(snapshot, PickledModule):
        snapshot = {"ema": snapshot}
    if not isinstance(snapshot, dict):
        raise EctuneError(f"not a snapshot: the pickle holds a {type(snapshot).__name__}, expected a dict")
    out: dict[str, Any] = {"keys": sorted(map(str, snapshot)), "easydict": isinstance(snapshot, SnapshotDict)}
    if isinstance(snapshot.get("ema"), PickledModule):
        out["network"] = _network_metadata(snapshot["ema"])
    if isinstance(snapshot.get("dataset_kwargs"), dict):
        out["dataset_kwargs"] = _jsonable(snapshot["dataset_kwargs"])
    for key in ("loss_fn", "augment_pipe", "encoder"):
        obj = snapshot.get(key)
        if isinstance(obj, PickledModule):
            out[key] = _object_metadata(obj)
        elif key in snapshot:
            out[key] = _jsonable(obj)
    return out
