"""Checkpoints: safetensors weights + JSON config, written atomically; loading never runs code.

A run folder looks like

    run/config.json                  the full RunConfig
    run/data.json                    the fingerprint of the data it trains on (see runs.py)
    run/log.jsonl                    one JSON object per logged step
    run/samples/*.png                interval sample grids
    run/checkpoints/00001000/        one folder per checkpoint, renamed into place when complete:
        model.safetensors            tensors "net.*" (online) and "ema.*"; metadata holds the config
        train_state.pt               optimizer, RNG and data-order state (torch.load weights_only=True)
        mid_times.json               searched k-step mid times, if any (`ectune eval --search-mid-t`)

A checkpoint is written into `checkpoints/.tmp-*`, fsynced, then renamed to its step's name, so a
crash at any instant leaves the previous checkpoints whole; leftovers of a crash are removed by the
next save. `--ckpt` anywhere accepts a run folder (its latest checkpoint), a checkpoint folder, or a
`model.safetensors` file (also one exported on its own: its metadata carries the config).

Searched mid times (`ectune eval --search-mid-t`) live beside the weights in `mid_times.json`
(`NAME.mid_times.json` for a weights file not named model.safetensors), so the weights file and its
sha256 never change; `read_weights` folds them into the config and metadata it returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .atomic import atomic_file, fsync_path, make_readable
from .config import RunConfig
from .errors import EctuneError

CKPT_DIR = "checkpoints"
_PARTIAL = (".tmp-", ".old-")       # folders of an unfinished save: never read, removed by the next save
_WARNED: set[str] = set()            # damaged checkpoints already reported by this process


class RunMismatch(EctuneError):
    """A checkpoint that is whole but does not fit what this command passed (e.g. other data): the
    advice to delete the checkpoint does not apply."""


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / "model.safetensors").is_file())


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every published checkpoint folder of a run, oldest first, whole or damaged (a folder with a
    step's name lacking a file was damaged after its save, which publishes folders whole)."""
    root = Path(run_dir) / CKPT_DIR
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []


def save_checkpoint(run_dir: Path, step: int, cfg: RunConfig, tensors: dict[str, torch.Tensor],
                    train_state: dict, *, keep: int = 3) -> Path:
    """Write checkpoint `step` into a temporary folder, fsync, rename it into place; keep the last `keep`.

    A full disk or a read-only folder raises EctuneError and leaves the previous checkpoints as they were.
    """
    root = Path(run_dir) / CKPT_DIR
    final = root / f"{step:08d}"
    tmp = root / f"{_PARTIAL[0]}{step:08d}-{os.getpid()}"
    try:
        if root.is_dir():
            _remove_partial(root)
        tmp.mkdir(parents=True)             # with checkpoints/ itself: an empty one means checkpoints were removed
        meta = {"config": cfg.to_json(), "step": str(step), "format": "ectune-1"}
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(cpu, tmp / "model.safetensors", metadata=meta)
        _write_train_state(tmp / "train_state.pt", train_state)
        for p in tmp.iterdir():
            make_readable(p)                    # safetensors writes through a private (0600) temporary
            fsync_path(p)
        fsync_path(tmp)
        _publish(tmp, final)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()                        # only if empty: a first save that failed leaves no trace
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
    run = p.parent if p.name == CKPT_DIR and not (p / CKPT_DIR).is_dir() else p   # RUN/checkpoints itself
    folders = checkpoint_folders(run)
    intact = [c for c in folders if _readable(c / "model.safetensors")]
    if intact:
        _warn_damaged(folders[folders.index(intact[-1]) + 1:], intact[-1])
        return intact[-1] / "model.safetensors"
    if folders:
        raise EctuneError(f"every checkpoint of {run} is damaged ({', '.join(map(str, folders))}); "
                          "pass another run folder or a .safetensors file")
    if p.exists():
        raise EctuneError(f"{p} holds no checkpoint; pass a run folder with checkpoints/ or a .safetensors file")
    raise EctuneError(f"checkpoint {p} does not exist; pass a run folder or a .safetensors weights file")


def _readable(f: Path) -> bool:
    """Whether a weights file exists and its header covers the file (a truncated one fails this)."""
    try:
        with safe_open(str(f), framework="pt"):
            return True
    except (SafetensorError, OSError, ValueError):
        return False


def _warn_damaged(damaged: list[Path], used: Path) -> None:
    """Say on stderr (once per process) which newer checkpoints are damaged and which one is used."""
    new = [str(c) for c in damaged if str(c) not in _WARNED]
    if new:
        _WARNED.update(new)
        print(f"ectune: warning: checkpoint {', '.join(new)} is damaged (missing or truncated model.safetensors); "
              f"using the intact {used}; delete the damaged one to silence this", file=sys.stderr)


def mid_times_file(weights: Path) -> Path:
    """The sidecar that holds a weights file's searched mid times."""
    weights = Path(weights)
    name = "mid_times.json" if weights.name == "model.safetensors" else f"{weights.stem}.mid_times.json"
    return weights.with_name(name)


def read_mid_times(weights: Path) -> dict[str, list[float]]:
    """Searched mid times by step count: the metadata entry of files written before the sidecar,
    updated by the sidecar. A corrupt sidecar or entry raises EctuneError naming it."""
    f = Path(weights)
    try:
        with safe_open(str(f), framework="pt") as handle:
            old = (handle.metadata() or {}).get("mid_ts_by_steps", "{}")
    except (SafetensorError, OSError, ValueError) as e:
        raise EctuneError(f"cannot read weights {f}: {e}; the file is corrupt or not a safetensors file") from None
    side = mid_times_file(f)
    found = _mid_times_json(old, f"{f} (metadata mid_ts_by_steps)")
    if side.exists():
        try:
            text = side.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EctuneError(f"cannot read {side} ({e}); delete it and search the mid times again") from None
        found.update(_mid_times_json(text, str(side)))
    return found


def mid_times_key(steps: int, gamma: float = 1.0) -> str:
    """The sidecar's key of `steps`-step mid times searched at re-noising γ: "2", or "2@gamma0.5"."""
    return str(steps) if gamma == 1 else f"{steps}@gamma{float(gamma):g}"


def update_mid_times(weights: Path, mid_ts, gamma: float = 1.0) -> Path:
    """Add searched mid times for (len(mid_ts) + 1)-step sampling at re-noising `gamma` to the sidecar
    of a weights file, atomically, keeping the other entries (a 3-step search does not erase the 2-step
    times, nor a γ = 0.5 search those of γ = 1). The weights file stays byte for byte as it was: its
    sha256 is the checkpoint's identity. Returns the sidecar."""
    f = Path(weights)
    by_steps = {**read_mid_times(f), mid_times_key(len(mid_ts) + 1, gamma): [float(t) for t in mid_ts]}
    side = mid_times_file(f)
    try:
        with atomic_file(side) as out:
            out.write((json.dumps(dict(sorted(by_steps.items())), indent=1) + "\n").encode("utf-8"))
    except OSError as e:
        raise EctuneError(f"cannot write {side} ({e}); check permissions and free space") from None
    return side


_MID_KEY = re.compile(r"\d+(@gamma(0|0?\.\d+|\d(\.\d+)?e-\d+))?")    # "2", "2@gamma0.5" (γ as "%g", < 1)


def _mid_times_json(text: str, source: str) -> dict[str, list[float]]:
    try:
        by_steps = json.loads(text)
        ok = isinstance(by_steps, dict) and all(
            _MID_KEY.fullmatch(k) and isinstance(v, list) and len(v) == int(k.split("@")[0]) - 1 and
            all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in v) for k, v in by_steps.items())
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        raise EctuneError(f"{source} is corrupt: expected {{\"STEPS\": [mid times, ...]}}; delete it and "
                          "search the mid times again (ectune eval --search-mid-t)")
    return {k: [float(t) for t in v] for k, v in by_steps.items()}


def read_weights(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor], dict]:
    """(config, tensors, metadata) of a weights file; a corrupt or foreign file raises EctuneError.
    Searched mid times (see `read_mid_times`) are folded in: the 2-step ones of the config's sample.gamma
    into its sample.mid_ts, all of them into metadata["mid_ts_by_steps"]."""
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
    mid = read_mid_times(f)
    if mid:
        meta["mid_ts_by_steps"] = json.dumps(mid)
    key = mid_times_key(2, cfg.sample.gamma)
    if key in mid:
        from dataclasses import replace
        cfg = replace(cfg, sample=replace(cfg.sample, mid_ts=tuple(mid[key])))
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
def resuming(ckpt_dir: Path, before: Path | None = None):
    """Turn any failure to apply checkpoint `ckpt_dir` (`before`: the one before it) into an EctuneError
    saying how to resume anyway; a RunMismatch (the checkpoint is whole) passes unchanged."""
    run = Path(ckpt_dir).parent.parent
    hint = (f"to resume from the checkpoint before it ({before}), delete {ckpt_dir}" if before is not None else
            f"it is the run's only checkpoint: to start the run over, remove {run} or choose another --out")
    try:
        yield
    except RunMismatch:
        raise
    except EctuneError as e:
        raise EctuneError(f"{e}; {hint}") from None
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # a state that does not fit this run
        raise EctuneError(f"cannot resume from {ckpt_dir} ({type(e).__name__}: {e}); {hint}") from None


def trim_log(run_dir: Path, step: int, name: str = "log.jsonl") -> None:
    """Drop the records of RUN/`name` after `step` (written after the checkpoint a run resumes from)
    and torn lines."""
    path = Path(run_dir) / name
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
