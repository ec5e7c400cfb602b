"""Mid-time search for k-step consistency sampling, and storing the result in a checkpoint.

ECT.md §5: the intermediate times of 2-step (k-step) sampling are an open choice (0.821 on CIFAR-10,
1.526 on ImageNet-64). `search_mid_times` scans candidates on a held-out seed set — seeds that the
evaluation never uses — and `store_mid_times` writes the best ones into a sidecar beside the
checkpoint's weights (which stay unchanged), so `ectune sample --steps k` uses them from then on.
`search_and_store` is both, as `ectune eval --search-mid-t` runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .checkpoint import mid_times_key, read_mid_times, resolve_weights, update_mid_times
from .errors import EctuneError
from .progress import Progress
from .sampling import Sampler, sample_images, seed_labels

HELDOUT_SEED0 = 1_000_000           # held-out seeds start here; evaluation seeds start at 0 by default


def candidate_grid(lo: float = 0.1, hi: float = 10.0, count: int = 9) -> list[float]:
    """`count` candidate mid times spaced evenly in log σ between lo and hi."""
    return [float(v) for v in np.geomspace(lo, hi, count)]


def search_mid_times(D, shape, score: Callable, *, steps: int = 2, candidates: Sequence[float] | None = None,
                     seeds: Sequence[int] | None = None, t_max: float = 80.0, batch: int = 500, device=None,
                     class_labels=None, progress=None, gamma: float = 1.0,
                     known: dict | None = None) -> tuple[list[float], list[dict]]:
    """Best mid times for `steps`-step sampling (re-noising `gamma`) by `score(samples) -> lower is better`.

    steps = 2 scans each candidate t_1; steps > 2 searches coordinate-wise, one mid time at a time
    from the left, keeping the times decreasing. Returns (best mid times, every tried row).
    `progress` (a `progress.Progress`) is advanced by one per sample drawn. `known` maps (γ, mid times)
    to scores on these seeds: those are not sampled again, and new scores are added to it.
    """
    if steps < 2:
        raise EctuneError("a mid-time search needs --steps 2 or more")
    cands = sorted(set(candidates or candidate_grid()), reverse=True)
    if not cands or cands[0] >= t_max or cands[-1] <= 0:
        raise EctuneError(f"mid-time candidates must lie in (0, {t_max}), got {cands}")
    seeds = list(seeds if seeds is not None else range(HELDOUT_SEED0, HELDOUT_SEED0 + 1000))
    tried: list[dict] = []
    cache = {} if known is None else known
    gamma = float(gamma)

    def evaluate(mid: tuple[float, ...]) -> float:
        if (gamma, mid) not in cache:
            x = sample_images(D, seeds, shape, Sampler.consistency([t_max, *mid], gamma), batch=batch, device=device,
                              class_labels=class_labels, progress=progress)
            cache[gamma, mid] = float(score(x))
        if all(r["mid_ts"] != list(mid) for r in tried):
            tried.append(tried_row(mid, gamma, cache[gamma, mid]))
        return cache[gamma, mid]

    # Start from a geometric spacing, then improve one coordinate at a time.
    best = list(np.geomspace(cands[0], cands[-1], steps - 1)) if steps > 2 else [cands[len(cands) // 2]]
    best = [min(cands, key=lambda c: abs(np.log(c / b))) for b in best]
    for i in range(steps - 1):
        upper = best[i - 1] if i > 0 else t_max
        lower = best[i + 1] if i + 1 < steps - 1 else 0.0
        options = [c for c in cands if lower < c < upper] or [best[i]]
        best[i] = min(options, key=lambda c: evaluate(tuple(best[:i] + [c] + best[i + 1:])))
    return best, tried


def tried_row(mid: Sequence[float], gamma: float, score: float) -> dict:
    """One tried row of a search: {"mid_ts", "score"} and "gamma" where it is not 1."""
    return {"mid_ts": list(mid), "score": score, **({"gamma": gamma} if gamma != 1 else {})}


def known_scores(rows: Sequence[dict]) -> dict:
    """The `known` scores of tried rows (`tried_row`'s form): {(γ, mid times): score}."""
    return {(float(r.get("gamma", 1.0)), tuple(r["mid_ts"])): r["score"] for r in rows}


GAMMA_GRID = (1.0, 0.9, 0.7, 0.5, 0.3, 0.0)


def search_mid_and_gamma(D, shape, score: Callable, *, gammas: Sequence[float] = GAMMA_GRID,
                         candidates: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
                         t_max: float = 80.0, batch: int = 500, device=None, class_labels=None,
                         progress=None, known: dict | None = None) -> tuple[list[float], float, list[dict]]:
    """Best (mid time, γ) of 2-step sampling. The mid time is scanned at both ends of the γ range, 1
    (fresh noise) and the smallest of `gammas` (0: deterministic); the γs between are tried at the
    better end's mid time; if one of them beats both ends, the mid time is scanned again at it.
    Returns (mid times, γ, tried rows). Both ends are scanned because each end's best mid time can be
    a poor one for the other: at 384k tuning images γ 1's best, 0.44, made γ 0 look worse than γ 1,
    while γ 0 at 4.57 was better than both. `known` scores (see `search_mid_times`) are reused.
    `progress` is advanced by one per sample drawn (at most (3·candidates + gammas) × seeds)."""
    kw = dict(steps=2, candidates=candidates, seeds=seeds, t_max=t_max, batch=batch, device=device,
              class_labels=class_labels, progress=progress)
    known = {} if known is None else known
    grid = sorted({1.0, *(float(g) for g in gammas)})
    best, tried = {}, []

    def scan(g: float, candidates) -> None:
        mid, rows = search_mid_times(D, shape, score, gamma=g, known=known, **{**kw, "candidates": candidates})
        best[g] = mid
        tried.extend(r for r in rows if r not in tried)
    for g in dict.fromkeys((1.0, grid[0])):
        scan(g, candidates)
    score_at = {g: known[g, tuple(m)] for g, m in best.items()}
    end = min(score_at, key=score_at.get)
    for g in (g for g in grid if g not in score_at):
        scan(g, best[end])
        score_at[g] = known[g, tuple(best[end])]
    gamma = min(score_at, key=score_at.get)
    if gamma not in (1.0, grid[0]):     # (the candidates hold the end's mid time: the result is no worse)
        scan(gamma, candidates)
    return list(best[gamma]), gamma, tried


def stored_mid_times(ckpt, steps: int, gamma: float = 1.0) -> list[float] | None:
    """The searched mid times for `steps`-step sampling at re-noising `gamma` stored with a checkpoint,
    if any (the sidecar `mid_times.json`, or the weights' metadata for files written before it). A
    corrupt sidecar or entry raises EctuneError naming it."""
    found = read_mid_times(resolve_weights(ckpt)).get(mid_times_key(steps, gamma))
    return found if found is not None and len(found) == steps - 1 else None


def store_mid_times(ckpt, mid_ts: Sequence[float], gamma: float = 1.0) -> Path:
    """Store searched mid times for (len(mid_ts) + 1)-step sampling at re-noising `gamma` with the
    checkpoint (see `checkpoint.update_mid_times`: a sidecar beside the weights, which stay byte for
    byte as they were). Returns the sidecar."""
    return update_mid_times(resolve_weights(ckpt), mid_ts, gamma)


def search_and_store(D, cfg, ckpt, score: Callable, *, steps: int, eval_seeds: Sequence[int], n: int = 1000,
                     candidates: Sequence[float] | None = None, batch: int = 500, device=None, progress: bool = True,
                     log: Callable[[str], None] | None = None, gamma: float = 1.0,
                     gammas: Sequence[float] | None = None) -> dict:
    """`ectune eval --search-mid-t`: the best mid times of `steps`-step sampling of the model of `cfg`
    at re-noising `gamma` on `n` held-out seeds (13 log-spaced candidates from 0.1 to 10 by default),
    stored with `ckpt`. With `gammas` (`--search-gamma`), 2-step mid time and γ are searched together
    (`search_mid_and_gamma`) and the mid time is stored for the γ found. Returns the record's
    "mid_t_search" entry: the best times (and γ), the held-out seeds and every tried row."""
    held = list(range(HELDOUT_SEED0, HELDOUT_SEED0 + n))
    if eval_seeds[-1] >= HELDOUT_SEED0:
        raise EctuneError(f"evaluation seeds must stay below {HELDOUT_SEED0}, where the held-out search seeds start")
    cands = candidates or candidate_grid(0.1, 10.0, 13)
    shape = cfg.net.image_shape
    kw = dict(candidates=cands, seeds=held, t_max=cfg.sample.t_max, batch=batch, device=device,
              class_labels=seed_labels(held, cfg.net.label_dim))
    if gammas is not None:
        if steps != 2:
            raise EctuneError("--search-gamma searches 2-step sampling: pass --steps 2")
        with Progress((3 * len(cands) + len(set(gammas))) * len(held), "mid-time and γ search",
                      bar=progress) as bar:
            best, gamma, tried = search_mid_and_gamma(D, shape, score, gammas=gammas, progress=bar, **kw)
    else:
        with Progress(len(cands) * len(held) * (steps - 1), "mid-time search", bar=progress) as bar:
            best, tried = search_mid_times(D, shape, score, steps=steps, progress=bar, gamma=gamma, **kw)
    stored = store_mid_times(ckpt, best, gamma)
    if log is not None:
        at = f" at γ {gamma:g}" if gammas is not None else ""
        use = f" (sample with --gamma {gamma:g} to use them)" if gammas is not None and gamma != cfg.sample.gamma \
            else ""
        log(f"best mid times {[round(t, 4) for t in best]}{at} on {len(held)} held-out seeds; stored in {stored}{use}")
    found = {"gamma": gamma} if gammas is not None else {}
    return {"mid_ts": best, **found, "heldout_seeds": [held[0], held[-1] + 1], "tried": tried}
