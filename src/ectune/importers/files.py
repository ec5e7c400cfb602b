"""Standalone weights files: one set of weights + its config, loadable by ectune and plain PyTorch.

A file ``NAME.safetensors`` holds the EDMPrecond state_dict under one prefix, ``ema.`` (averaged
weights) or ``net.`` (online weights), with the full RunConfig JSON in its metadata, as run
checkpoints do; ``NAME.json`` beside it repeats the metadata for people and tools. Plain PyTorch::

    from safetensors.torch import load_file
    from ectune.models import build_denoiser
    from ectune.checkpoint import read_weights
    cfg, tensors, _ = read_weights("model.safetensors")
    D = build_denoiser(cfg.net)
    D.load_state_dict({k.split(".", 1)[1]: v for k, v in load_file("model.safetensors").items()})
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from ..atomic import atomic_file
from ..checkpoint import load_state_checked, read_weights, resolve_weights, split_prefix
from ..config import RunConfig
from ..errors import EctuneError
from ..models import build_denoiser, check_which

FORMAT = "ectune-1"


def write_model_file(out: str | Path, cfg: RunConfig, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write `tensors` with `cfg` in the metadata to `out` (atomically) and a ``.json`` sidecar."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise EctuneError(f"--out {out} must end in .safetensors")
    metadata = {**{k: str(v) for k, v in meta.items()}, "config": cfg.to_json(), "format": FORMAT}
    sidecar = {**{k: v for k, v in metadata.items() if k != "config"}, "config": json.loads(cfg.to_json()),
               "tensors": len(tensors), "params": sum(t.numel() for t in tensors.values())}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as f:
            f.write(save(tensors, metadata=metadata))
        with atomic_file(out.with_suffix(".json")) as f:
            f.write(json.dumps(sidecar, indent=1).encode())
    except OSError as e:
        raise EctuneError(f"cannot write {out}: {e}; choose a writable --out") from None
    return out


def export_weights(ckpt: str | Path, out: str | Path, which: str = "ema") -> Path:
    """Write the `which` ("ema" or "net") weights of a run, checkpoint or weights file to `out`."""
    check_which(which)
    src = resolve_weights(ckpt)
    if Path(out).resolve() == src.resolve():
        raise EctuneError(f"--out {out} is the checkpoint being exported; choose another path")
    cfg, tensors, meta = read_weights(src)
    state = split_prefix(tensors, which)
    if not state:
        have = sorted({k.split(".", 1)[0] for k in tensors})
        raise EctuneError(f"{src} holds no '{which}' weights (it has {have}); "
                          f"pass --weights {have[0] if have else 'ema'}")
    load_state_checked(build_denoiser(cfg.net), state, f"{src} ({which} weights)")
    meta = {"step": meta.get("step", "0"), "weights": which, "source": str(src), "note": meta.get("note", "")}
    return write_model_file(out, cfg, {f"{which}.{k}": v.contiguous() for k, v in state.items()}, meta)
