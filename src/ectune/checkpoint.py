"""Checkpoints: safetensors weights + JSON config, written atomically; loading never runs code.

A run folder looks like

    run/config.json                  the full RunConfig
    run/log.jsonl                    one JSON object per logged step
    run/samples/*.png                interval sample grids
    run/checkpoints/00001000/        one folder per checkpoint, renamed into place when complete:
        model.safetensors            tensors "net.*" (online) and "ema.*"; metadata holds the config
        train_state.pt               optimizer, RNG and data-order state (torch.load weights_only=True)

A checkpoint is written into `checkpoints/.tmp-*`, fsynced, then renamed to its step's name, so a
crash at any instant leaves the previous checkpoints whole; leftovers of a crash are removed by the
next save. `--ckpt` anywhere accepts a run folder (its latest checkpoint), a checkpoint folder, or a
`model.safetensors` file (also one exported on its own: its metadata carries the config).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .atomic import atomic_file, fsync_path
from .config import RunConfig
from .errors import EctuneError

CKPT_DIR = "checkpoints"
_PARTIAL = (".tmp-", ".old-")       # folders of an unfinished save: never read, removed by the next save


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / "model.safetensors").is_file())


def save_checkpoint(run_dir: Path, step: int, cfg: RunConfig, tensors: dict[str, torch.Tensor],
                    train_state: dict, *, keep: int = 3) -> Path:
    """Write checkpoint `step` into a temporary folder, fsync, rename it into place; keep the last `keep`.

    A full disk or a read-only folder raises EctuneError and leaves the previous checkpoints as they were.
    """
    root = Path(run_dir) / CKPT_DIR
    final = root / f"{step:08d}"
    tmp = root / f"{_PARTIAL[0]}{step:08d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_partial(root)
        tmp.mkdir()
        meta = {"config": cfg.to_json(), "step": str(step), "format": "ectune-1"}
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(cpu, tmp / "model.safetensors", metadata=meta)
        _write_train_state(tmp / "train_state.pt", train_state)
        for p in [*tmp.iterdir(), tmp]:
            fsync_path(p)
        _publish(tmp, final)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EctuneError(f"cannot write checkpoint {final} ({' '.join(str(e).split())}); free disk space or "
                          f"check the permissions of {root}; the previous checkpoints are intact") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_train_state(path: Path, train_state: dict) -> None:
    with open(path, "wb") as f:
        try:
            torch.save(train_state, f)
        except RuntimeError as e:           # how torch.save reports a failed write
            raise OSError(f"writing {path.name} failed: {e}") from e


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete `tmp` folder to `final`; an existing `final` is first moved aside, never half-deleted."""
    aside = final.with_name(f"{_PARTIAL[1]}{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_partial(root: Path) -> None:
    """Remove what a save that crashed left behind (only rank 0 ever writes checkpoints)."""
    for p in root.iterdir():
        if p.name.startswith(_PARTIAL):
            shutil.rmtree(p, ignore_errors=True)



def resolve_weights(path: str | Path) -> Path:
    """Run folder → its latest checkpoint's model.safetensors; checkpoint folder or file → itself;
    diffusers model folder → its UNet's safetensors weights."""
    from .importers.diffusers_vp import diffusers_root, diffusers_weights_file
    p = Path(path)
    if p.is_file():
        return p
    if diffusers_root(p) is not None:
        return diffusers_weights_file(diffusers_root(p))
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
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise EctuneError(f"cannot read weights {f}: {e}; the file is corrupt or not a safetensors file") from None
    if "config" not in meta:
        raise EctuneError(f"{f} has no ectune config in its metadata; was it written by ectune?")
    try:
        cfg = RunConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, RecursionError) as e:
        raise EctuneError(f"{f} carries an unreadable config ({e})") from None
    return cfg, tensors, meta


def read_train_state(ckpt_dir: Path) -> dict:
    """Optimizer / RNG / data-order state of a checkpoint folder (no code is executed)."""
    path = Path(ckpt_dir) / "train_state.pt"
    try:
        with warnings.catch_warnings():       # torch warns about odd pickle opcodes of a damaged file
            warnings.simplefilter("ignore")
            st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for corrupt files)
        raise EctuneError(f"cannot read {path} ({type(e).__name__}); the checkpoint is corrupt") from None
    want = {"step": int, "optimizer": dict, "sampler": dict, "nonfinite_total": int}
    bad = [k for k, t in want.items() if not isinstance(st, dict) or not isinstance(st.get(k), t)]
    if bad:
        raise EctuneError(f"{path} lacks {bad} or holds the wrong types; the checkpoint is corrupt or foreign")
    return st


@contextlib.contextmanager
def resuming(ckpt_dir: Path):
    """Turn any failure to apply checkpoint `ckpt_dir` into an EctuneError saying how to resume anyway."""
    hint = f"to resume from the checkpoint before it, delete {ckpt_dir}"
    try:
        yield
    except EctuneError as e:
        raise EctuneError(f"{e}; {hint}") from None
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # a state that does not fit this run
        raise EctuneError(f"cannot resume from {ckpt_dir} ({type(e).__name__}: {e}); {hint}") from None


def trim_log(run_dir: Path, step: int) -> None:
    """Drop the log records after `step` (written after the checkpoint a run resumes from) and torn lines."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    keep = [line for line in lines if _log_step(line) <= step and line.endswith("\n")]
    if keep != lines:
        with atomic_file(path) as f:
            f.write("".join(keep).encode("utf-8"))


def _log_step(line: str) -> float:
    """The step of a log line; +inf for a line that is not a JSON object (a torn write)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return float("inf")
    if not isinstance(rec, dict):
        return float("inf")
    s = rec.get("step", 0)
    return s if isinstance(s, (int, float)) and not isinstance(s, bool) else 0


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
