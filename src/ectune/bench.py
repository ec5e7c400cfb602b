"""What the benchmark scripts share (benchmarks/*.py): a results cache that two processes running the
same benchmark split between them, scored rows of a sampler or of a tuned run's 1 and 2 steps (the mid
time searched on held-out seeds), tune runs with the benchmarks' settings through the library, and the
compute seconds and iteration cost of a run's method.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import read_config
from .evaluate import fd_only, score_samples
from .midtime import (HELDOUT_SEED0, candidate_grid, known_scores, search_mid_and_gamma, search_mid_times,
                      store_mid_times)
from .models import load_denoiser
from .presets import preset
from .report import read_records
from .report import train_seconds as logged_seconds
from .sampling import Sampler, sample_images

SHAPE = (1, 28, 28)                     # the benchmarks' Fashion-MNIST images
MID_GRID = (0.2, 10.0, 11)              # candidate mid times, log-spaced (lo, hi, count)
BATCH = 128                             # sampling batch: faster on CPU than larger ones


class RowCache:
    """One JSON file per finished piece of work, under ROOT/rows."""

    def __init__(self, root: Path):
        self.root = Path(root) / "rows"
        self.root.mkdir(parents=True, exist_ok=True)

    def has(self, name: str) -> bool:
        """Whether the row `name` is cached."""
        return (self.root / f"{name}.json").is_file()

    def peek(self, name: str) -> dict | None:
        """The cached value of `name`, or None (nothing is computed)."""
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def get(self, name: str, fn, *, wait: bool = True):
        """The cached value of `name`, computing it with `fn` if no process has. A second process running
        the same command skips the rows the first one is computing (`wait=False` returns None for them),
        so two processes share the work of one benchmark."""
        path, claim = self.root / f"{name}.json", self.root / f"{name}.claim"
        while not path.exists():
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not _claim_alive(claim):
                    claim.unlink(missing_ok=True)
                    continue
                if not wait:
                    return None
                time.sleep(5)
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            try:
                if path.exists():                # finished by another process since the check
                    break
                return self._compute(name, path, fn)
            finally:
                claim.unlink(missing_ok=True)
        return json.loads(path.read_text())

    def _compute(self, name: str, path: Path, fn) -> dict:
        t0 = time.perf_counter()
        value = fn()
        value["bench_seconds"] = round(time.perf_counter() - t0, 1)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value, indent=1))
        tmp.replace(path)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in value.items() if isinstance(v, float)), flush=True)
        return value


def _claim_alive(claim: Path) -> bool:
    """Whether the process that wrote `claim` still runs (a claim being written counts as alive)."""
    try:
        pid = int(claim.read_text())
    except FileNotFoundError:
        return True                              # released just now: the loop looks again
    except ValueError:
        try:
            return time.time() - claim.stat().st_mtime < 60
        except FileNotFoundError:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def score_row(D, seeds, ref, sampler: Sampler, *, label: str) -> dict:
    """Classifier scores of D's samples for `seeds` with `sampler`, its seconds per image and its spec.
    (Rows cached before 2026-12-01 record the sampler as sample_images keyword arguments.)"""
    t0 = time.perf_counter()
    x = sample_images(D, seeds, SHAPE, sampler, batch=BATCH)
    sec = (time.perf_counter() - t0) / len(seeds)
    return {"label": label, **score_samples(x, ref), "seconds_per_image": sec, "n": len(seeds),
            "sampler": sampler.spec}


def teacher_row(D, seeds, ref, family: str, nfe: int, who: str = "teacher") -> dict:
    """A diffusion sampler's row: EDM Heun (NFE 2N − 1) or DPM-Solver++(2M) at `nfe` evaluations."""
    sampler, name = (Sampler.heun((nfe + 1) // 2), "Heun") if family == "heun" else \
        (Sampler.dpmpp2m(nfe), "DPM-Solver++(2M)")
    return {**score_row(D, seeds, ref, sampler, label=f"{who} {name} {nfe} NFE"), "nfe": nfe, "family": family}


class LazyRun:
    """A tuned run that is made (`make()` trains, continues or just returns its folder) and loaded only
    when a row of it is missing from the cache, so that a benchmark rebuilds its outputs from its cached
    rows without the run folders (a fresh clone) instead of training them again."""

    def __init__(self, make: Callable[[], Path] | Path):
        self._make = make if callable(make) else (lambda: Path(make))

    @property
    def made(self) -> bool:
        return "path" in self.__dict__

    @functools.cached_property
    def path(self) -> Path:
        return Path(self._make())

    @functools.cached_property
    def denoiser(self):
        """The run's EMA denoiser, loaded once."""
        return load_denoiser(self.path)[0]


def run_facts(cache: RowCache, name: str, run: LazyRun) -> dict:
    """A scored run's compute seconds and images, cached as `{name}-run` beside its rows."""
    def facts():
        cfg = read_config(run.path / "config.json")
        return {"train_seconds": train_seconds(run.path), "images": cfg.steps * cfg.batch}
    return cache.get(f"{name}-run", facts)


def consistency_rows(cache: RowCache, run: LazyRun | Path, name: str, seeds, ref, n_search: int,
                     gamma: bool = False) -> dict:
    """1- and 2-step rows of a tuned run on `seeds`, the mid time searched on `n_search` held-out seeds
    (and stored in the run, as `ectune eval --search-mid-t` does); with `gamma` also a 2-step row with
    CTM's γ-sampling ("2step_gamma"), mid time and γ searched together on the same held-out seeds.
    The run is made and loaded only for the rows that are not cached yet."""
    run = run if isinstance(run, LazyRun) else LazyRun(run)
    D = lambda: run.denoiser            # noqa: E731  (loads the run on first use)
    tag = f"n{len(seeds)}"
    held = list(range(HELDOUT_SEED0, HELDOUT_SEED0 + n_search))

    def search():
        best, tried = search_mid_times(D(), SHAPE, lambda x: fd_only(x, ref), batch=BATCH,
                                       candidates=candidate_grid(*MID_GRID), seeds=held)
        return {"mid_ts": best, "tried": tried}
    grid = "-".join(f"{v:g}" for v in MID_GRID)
    searched = cache.get(f"{name}-midt-{n_search}-grid{grid}", search)
    mid = searched["mid_ts"]
    one = cache.get(f"{tag}-{name}-1step", lambda: score_row(D(), seeds, ref, Sampler.consistency([80.0]),
                                                             label=f"{name} 1 step"))
    two = cache.get(f"{tag}-{name}-2step-mid{mid[0]:.4g}", lambda: score_row(
        D(), seeds, ref, Sampler.consistency([80.0, *mid]), label=f"{name} 2 steps (mid {mid[0]:.3g})"))
    facts = run_facts(cache, name, run)
    out = {"1step": one, "2step": two, "mid_ts": mid, "train_seconds": facts["train_seconds"],
           "images": facts["images"]}
    if gamma:
        def joint():        # (scores on these held-out seeds already found, by the search above or by the
            #                 one-ended search of before 2026-12-02, cached as "-midgamma-", are not sampled again)
            earlier = cache.peek(f"{name}-midgamma-{n_search}-grid{grid}") or {"tried": []}
            known = known_scores(searched["tried"] + earlier["tried"])
            m, g, tried = search_mid_and_gamma(D(), SHAPE, lambda x: fd_only(x, ref), batch=BATCH, seeds=held,
                                               candidates=candidate_grid(*MID_GRID), known=known)
            return {"mid_ts": m, "gamma": g, "tried": tried}
        found = cache.get(f"{name}-midgamma2-{n_search}-grid{grid}", joint)
        m, g = found["mid_ts"], found["gamma"]
        out["2step_gamma"] = cache.get(f"{tag}-{name}-2step-mid{m[0]:.4g}-gamma{g:g}", lambda: score_row(
            D(), seeds, ref, Sampler.consistency([80.0, *m], g), label=f"{name} 2 steps (mid {m[0]:.3g}, γ {g:g})"))
        out.update(gamma_mid_ts=m, gamma=g)
        if run.made:
            store_mid_times(run.path, m, g)
    if run.made:                        # a run that was loaded gets its searched times, as `ectune eval` stores them
        store_mid_times(run.path, mid)
    return out


def tune_run(out: Path, teacher: str, method: str, *, steps: int, batch: int, seed: int | None = None,
             data: str = "fashion-mnist", overrides=(), device: str = "auto") -> Path:
    """The tune run `out` with the benchmarks' settings (fmnist preset, a checkpoint every 50 steps, one
    grid at the end, a log record every 10 steps), trained or continued through the library as
    `ectune tune` would; a finished run is returned as it is (without taking its lock). A run stopped
    by a signal exits the process (SystemExit) instead of returning a run that is not finished."""
    from .models import resolve_device
    from .runs import train_run
    from .start import configure, fit_preset_eval, tune_base, tune_parts
    out = Path(out)
    if (out / "checkpoints" / f"{steps:08d}").is_dir():
        return out
    sets = ["ckpt_every=50", f"sample_every={steps}", "log_every=10", *overrides]
    base = tune_base(method, teacher, "fmnist", data, out)
    cfg, notes = fit_preset_eval(configure(base.cfg, overrides=sets, steps=steps, batch=batch, seed=seed,
                                           data=data), sets)
    ds, D, frozen = tune_parts(cfg, base)
    r = train_run(cfg, out, ds, D, device=resolve_device(device), teacher=frozen, progress=False, notes=tuple(notes))
    if r.status == "stopped":               # a signal: checkpointed, and nothing may score the unfinished run
        raise SystemExit(f"{out} stopped at step {r.step} of {steps} (a signal); run the same command again to continue")
    return out


def train_seconds(run: Path) -> float:
    """Compute seconds of a (possibly resumed) run, from its logged throughput (ectune.report's rule)."""
    return logged_seconds(read_config(Path(run) / "config.json"), read_records(Path(run) / "log.jsonl"))


def iteration_seconds(teacher: str, methods, batch: int, reps: int = 12, shape=(1, 28, 28)) -> dict:
    """Median seconds of one training iteration per method ("edm" = pretraining) on the teacher's network
    (TCM: the truncated pair of two copies), the methods' iterations interleaved so that a drift of the
    machine's speed affects them alike; CD and CMT with the frozen teacher."""
    import contextlib

    from .checkpoint import read_weights
    from .methods import METHODS
    from .methods.tcm import T_PRIME
    from .models import student_from
    from .training import stepping
    t_cfg, tensors, _ = read_weights(teacher)
    images = torch.randint(0, 256, (4 * batch, *shape), dtype=torch.uint8)
    with contextlib.ExitStack() as stack:
        steps = {}
        for m in methods:
            base = preset("fmnist", "pretrain" if m == "edm" else "tune")
            tcm = METHODS[m].teacher_kind == "tune"                             # TCM: the truncated pair
            net = replace(t_cfg.net, truncate_t=T_PRIME if tcm else 0.0)
            cfg = replace(base, batch=batch, net=net, loss=replace(base.loss, method=m))
            D = student_from(tensors, net, str(teacher)).train()
            frozen = student_from(tensors, t_cfg.net, str(teacher)) if METHODS[m].frozen_teacher else None
            steps[m] = stack.enter_context(stepping(cfg, D, images, device=torch.device("cpu"), teacher=frozen))
        times = {m: [] for m in methods}
        for _ in range(reps + 2):
            for m, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[m].append(time.perf_counter() - t0)
    return {m: float(np.median(v[2:])) for m, v in times.items()}
