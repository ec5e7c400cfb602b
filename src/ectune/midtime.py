"""Mid-time search for k-step consistency sampling, and storing the result in a checkpoint.

ECT.md §5: the intermediate times of 2-step (k-step) sampling are an open choice (0.821 on CIFAR-10,
1.526 on ImageNet-64). `search_mid_times` scans candidates on a held-out seed set — seeds that the
evaluation never uses — and `store_mid_times` writes the best ones into a sidecar beside the
checkpoint's weights (which stay unchanged), so `ectune sample --steps k` uses them from then on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_file
from .checkpoint import mid_times_file, read_mid_times, resolve_weights
from .errors import EctuneError
from .sampling import sample_images

HELDOUT_SEED0 = 1_000_000           # held-out seeds start here; evaluation seeds start at 0 by default


def candidate_grid(lo: float = 0.1, hi: float = 10.0, count: int = 9) -> list[float]:
    """`count` candidate mid times spaced evenly in log σ between lo and hi."""
    return [float(v) for v in np.geomspace(lo, hi, count)]


def search_mid_times(D, shape, score: Callable, *, steps: int = 2, candidates: Sequence[float] | None = None,
                     seeds: Sequence[int] | None = None, t_max: float = 80.0, batch: int = 500, device=None,
                     class_labels=None, progress=None) -> tuple[list[float], list[dict]]:
    """Best mid times for `steps`-step sampling by `score(samples) -> lower is better`.

    steps = 2 scans each candidate t_1; steps > 2 searches coordinate-wise, one mid time at a time
    from the left, keeping the times decreasing. Returns (best mid times, every tried row).
    `progress` (a `progress.Progress`) is advanced by one per sample drawn.
    """
    if steps < 2:
        raise EctuneError("a mid-time search needs --steps 2 or more")
    cands = sorted(set(candidates or candidate_grid()), reverse=True)
    if not cands or cands[0] >= t_max or cands[-1] <= 0:
        raise EctuneError(f"mid-time candidates must lie in (0, {t_max}), got {cands}")
    seeds = list(seeds if seeds is not None else range(HELDOUT_SEED0, HELDOUT_SEED0 + 1000))
    tried: list[dict] = []
    cache: dict[tuple, float] = {}

    def evaluate(mid: tuple[float, ...]) -> float:
        if mid not in cache:
            x = sample_images(D, seeds, shape, ts=[t_max, *mid], batch=batch, device=device,
                              class_labels=class_labels, progress=progress)
            cache[mid] = float(score(x))
            tried.append({"mid_ts": list(mid), "score": cache[mid]})
        return cache[mid]

    # Start from a geometric spacing, then improve one coordinate at a time.
    best = list(np.geomspace(cands[0], cands[-1], steps - 1)) if steps > 2 else [cands[len(cands) // 2]]
    best = [min(cands, key=lambda c: abs(np.log(c / b))) for b in best]
    for i in range(steps - 1):
        upper = best[i - 1] if i > 0 else t_max
        lower = best[i + 1] if i + 1 < steps - 1 else 0.0
        options = [c for c in cands if lower < c < upper] or [best[i]]
        best[i] = min(options, key=lambda c: evaluate(tuple(best[:i] + [c] + best[i + 1:])))
    return best, tried


def stored_mid_times(ckpt, steps: int) -> list[float] | None:
    """The searched mid times for `steps`-step sampling stored with a checkpoint, if any (the sidecar
    `mid_times.json`, or the weights' metadata for files written before it). A corrupt sidecar or
    entry raises EctuneError naming it."""
    found = read_mid_times(resolve_weights(ckpt)).get(str(steps))
    return found if found is not None and len(found) == steps - 1 else None


def store_mid_times(ckpt, mid_ts: Sequence[float]) -> Path:
    """Store searched mid times for (len(mid_ts) + 1)-step sampling beside the weights, atomically.

    They go into the sidecar (see `checkpoint.mid_times_file`), one entry per step count, so a 3-step
    search does not erase the 2-step times; the weights file stays byte for byte as it was (its
    sha256 is the checkpoint's identity in eval provenance). `read_weights` folds the 2-step times
    into the config's sample.mid_ts. Returns the sidecar.
    """
    f = resolve_weights(ckpt)
    by_steps = {**read_mid_times(f), str(len(mid_ts) + 1): [float(t) for t in mid_ts]}
    side = mid_times_file(f)
    try:
        with atomic_file(side) as out:
            out.write((json.dumps(dict(sorted(by_steps.items())), indent=1) + "\n").encode("utf-8"))
    except OSError as e:
        raise EctuneError(f"cannot write {side} ({e}); check permissions and free space") from None
    return side
