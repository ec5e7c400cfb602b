"""Command-line argument checks, all made before any work starts (nothing loaded, nothing written).

Each refusal is one :class:`EctuneError` that names the user's flag and what to do.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path

from .config import RunConfig
from .errors import EctuneError
from .sampling import check_times

_OUT_SUFFIXES = {"sample": (".png", ".npz"), "eval": (".json",)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args) -> None:
    """Refuse impossible command-line values with one EctuneError naming the flag."""
    cmd = args.cmd
    counts = {"pretrain": ("steps", "batch", "ckpt_every"), "tune": ("steps", "batch", "ckpt_every"),
              "sample": ("n", "steps", "batch", "num_steps", "nfe"),
              "eval": ("n", "steps", "batch", "num_steps", "nfe", "search_n"),
              "synth": ("n", "steps", "batch", "num_steps", "nfe", "shard_size")}.get(cmd, ())
    for name in counts:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise EctuneError(f"{_flag(name)} must be >= 1, got {value}")
    if getattr(args, "kimg", None) is not None and not (math.isfinite(args.kimg) and args.kimg > 0):
        raise EctuneError(f"--kimg must be a positive number of thousands of images, got {args.kimg}")
    if cmd in ("sample", "eval", "synth") and args.ts:
        check_times(args.ts, "--ts")
        if args.steps is not None:
            raise EctuneError("--ts and --steps both set the consistency times; pass one of them")
    if cmd in ("sample", "eval"):
        check_output(args.out, _OUT_SUFFIXES[cmd])
    if cmd == "eval" and args.candidates and not all(math.isfinite(t) for t in args.candidates):
        raise EctuneError(f"--candidates must be finite mid times, got {args.candidates}")
    if cmd == "eval" and args.search_gamma and not all(0 <= g <= 1 for g in args.search_gamma):
        raise EctuneError(f"--search-gamma takes re-noising values in [0, 1], got {args.search_gamma}")
    if getattr(args, "set", None):
        args.set = check_overrides(args.set)


def check_overrides(items: list[str]) -> list[str]:
    """--set KEY=VALUE: refuse what the config parser would misreport (unbalanced brackets, nan or inf
    for a number) and write a list [1,2,2] as the parser reads it, 1,2,2. Unknown keys are left to it."""
    defaults = dataclasses.asdict(RunConfig())
    out = []
    for item in items:
        out.append(item)
        key, _, value = item.partition("=")
        value = value.strip()
        default = _default_of(defaults, key.strip())
        if default is None or isinstance(default, str):
            continue
        if value.count("[") != value.count("]") or value.count("(") != value.count(")"):
            raise EctuneError(f"--set {item}: unbalanced brackets; write the whole list, e.g. "
                              f"--set {key.strip()}={_example(default)} (quote it in zsh)")
        words = [w.strip().lower().lstrip("+-") for w in value.strip("[]()").split(",")]
        if any(w in ("nan", "inf", "infinity") for w in words):
            kind = type(default[0] if isinstance(default, (list, tuple)) else default).__name__
            raise EctuneError(f"--set {item}: {key.strip()} expects {kind}, and nan and inf are not allowed; "
                              f"give a finite value, e.g. --set {key.strip()}={_example(default)}")
        if isinstance(default, (list, tuple)):
            out[-1] = f"{key}={value.strip('[]()')}"
    return out


def _default_of(defaults: dict, key: str):
    node = defaults
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if isinstance(node, dict) else node


def _example(default) -> str:
    if isinstance(default, (list, tuple)):
        return "[" + ",".join(map(str, default)) + "]"
    return str(default)


def check_output(out: str, suffixes: tuple[str, ...]) -> None:
    """--out must be a file name with one of `suffixes` in a folder this process can write
    (probed with a temporary file, removed at once); nothing else is created."""
    path = Path(out)
    if path.is_dir():
        raise EctuneError(f"--out {out} is a folder; give a file name ending in {' or '.join(suffixes)}")
    if path.suffix.lower() not in suffixes:
        raise EctuneError(f"--out {out} must end in {' or '.join(suffixes)}")
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:    # missing folders are made later: probe the first
        folder = folder.parent                                  # existing one
    if not folder.is_dir():
        raise EctuneError(f"--out {out}: {folder} is not a folder; choose another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ectune-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EctuneError(f"--out {out}: cannot write in {folder} ({e.strerror or e}); "
                          "choose a writable folder or fix its permissions") from None
