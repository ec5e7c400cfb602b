"""Checkpoints: safetensors weights + JSON config, written atomically; loading never runs code.

A run folder looks like

    run/config.json                  the full RunConfig
    run/log.jsonl                    one JSON object per logged step
    run/samples/*.png                interval sample grids
    run/checkpoints/00001000/        one folder per checkpoint, renamed into place when complete:
        model.safetensors            tensors "net.*" (online) and "ema.*"; metadata holds the config
        train_state.pt               optimizer, RNG and data-order state (torch.load weights_only=True)

`--ckpt` anywhere accepts a run folder (its latest checkpoint), a checkpoint folder, or a
`model.safetensors` file (also one exported on its own: its metadata carries the config).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from .config import RunConfig
from .errors import EctuneError

CKPT_DIR = "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / "model.safetensors").is_file())


def save_checkpoint(run_dir: Path, step: int, cfg: RunConfig, tensors: dict[str, torch.Tensor],
                    train_state: dict, *, keep: int = 3) -> Path:
    """Write checkpoint `step` into a temporary folder, fsync, then rename it into place."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{step:08d}"
    tmp = root / f".tmp-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = {"config": cfg.to_json(), "step": str(step), "format": "ectune-1"}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "model.safetensors", metadata=meta)
        torch.save(train_state, tmp / "train_state.pt")
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_weights(path: str | Path) -> Path:
    """Run folder → its latest checkpoint's model.safetensors; checkpoint folder or file → itself."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    ckpts = list_checkpoints(p)
    if ckpts:
        return ckpts[-1] / "model.safetensors"
    if p.exists():
        raise EctuneError(f"{p} holds no checkpoint; pass a run folder with checkpoints/ or a .safetensors file")
    raise EctuneError(f"checkpoint {p} does not exist; pass a run folder or a .safetensors weights file")


def read_weights(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor], dict]:
    """(config, tensors, metadata) of a weights file; a corrupt or foreign file raises EctuneError."""
    f = resolve_weights(path)
    try:
        with safe_open(str(f), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise EctuneError(f"cannot read weights {f}: {e}; the file is corrupt or not a safetensors file") from None
    if "config" not in meta:
        raise EctuneError(f"{f} has no ectune config in its metadata; was it written by ectune?")
    try:
        cfg = RunConfig.from_dict(json.loads(meta["config"]))
    except json.JSONDecodeError as e:
        raise EctuneError(f"{f} carries an unreadable config ({e})") from None
    return cfg, tensors, meta


def read_train_state(ckpt_dir: Path) -> dict:
    """Optimizer / RNG / data-order state of a checkpoint folder (no code is executed)."""
    try:
        return torch.load(Path(ckpt_dir) / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise EctuneError(f"cannot read {ckpt_dir}/train_state.pt ({type(e).__name__}); the checkpoint is corrupt") from None


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors stored under `prefix.` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a one-line error naming missing, unexpected or mis-shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or extra or shapes:
        raise EctuneError(f"{source} does not match this architecture: {len(missing)} missing, {len(extra)} "
                          f"unexpected, {len(shapes)} mis-shaped tensors (e.g. {(missing + extra + shapes)[:3]})")
    module.load_state_dict(state)
