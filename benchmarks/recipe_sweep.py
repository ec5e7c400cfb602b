"""The small-budget recipe sweep (issue #17, item 3): one setting at a time around a base recipe, at a
fixed image budget, scored on held-out seeds so that the headline benchmark's seeds play no part in
the choice.

    .venv/bin/python benchmarks/recipe_sweep.py --seeds 0                # screening, one seed
    .venv/bin/python benchmarks/recipe_sweep.py --seeds 1 --settings base,lr2e-4   # confirm on another
    .venv/bin/python benchmarks/recipe_sweep.py --outputs-only            # the outputs from the cached rows

Run the same command in two shells to use two cores: each finished setting is cached (runs in --runs,
rows in --out/rows) and a setting another process is tuning is skipped, then waited for at the end.
Every setting tunes the shipped Fashion-MNIST teacher for --images images (--steps × --batch unless the
setting changes the batch). 1- and 2-step samples of the averaged weights are scored on --n seeds
from SWEEP_SEED0 (classifier FD against the test set), the mid time searched on other held-out seeds
(bench.consistency_rows); the online weights are scored too, at the same mid time, and the averaged
weights with CTM's γ-sampling (mid time and γ searched together on the same held-out seeds).
Writes --out/results.json, --out/table.md and --out/recipe_sweep.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ectune.bench import RowCache, consistency_rows, score_row, tune_run
from ectune.evaluate import reference
from ectune.models import load_denoiser
from ectune.sampling import Sampler

SWEEP_SEED0 = 2_000_000                 # scoring seeds of the sweep: not the benchmarks' 0.. nor midtime's
BASE = ("sct", ["loss.P_mean=-0.6"])    # the best recipe of benchmarks/beyond_ect.py at 25.6k images
SETTINGS = {                            # name: (overrides on top of BASE, batch or None for --batch)
    "base": ([], None),
    "lr2e-4": (["optim.lr=2e-4"], None),
    "lr4e-4": (["optim.lr=4e-4"], None),
    "huber": (["loss.c=0.015"], None),              # iCT's pseudo-Huber c = 0.00054·√784 on the pixel sum
    "ema0.1": (["ema.sigma_rel=0.1"], None),
    "ema0.025": (["ema.sigma_rel=0.025"], None),
    "stages6": (["loss.stages=6"], None),
    "pstd1.6": (["loss.P_std=1.6"], None),
    "batch128": ([], 128),                           # half the steps at twice the batch
    "batch32": ([], 32),                             # twice the steps at half the batch
    "pmean-0.2": (["loss.P_mean=-0.2"], None),
    "pstd2.4": (["loss.P_std=2.4"], None),
    "ema0.015": (["ema.sigma_rel=0.015"], None),
    "lr2e-4-ema0.025": (["optim.lr=2e-4", "ema.sigma_rel=0.025"], None),
    "pmean-0.2-ema0.025": (["loss.P_mean=-0.2", "ema.sigma_rel=0.025"], None),
    "pstd2.4-ema0.015": (["loss.P_std=2.4", "ema.sigma_rel=0.015"], None),      # the two best single changes
    "pmean-0.2-pstd2.4-ema0.015": (["loss.P_mean=-0.2", "loss.P_std=2.4", "ema.sigma_rel=0.015"], None),
    "pmean-0.2-ema0.015": (["loss.P_mean=-0.2", "ema.sigma_rel=0.015"], None),
    "pmean-0.2-pstd2.4": (["loss.P_mean=-0.2", "loss.P_std=2.4"], None),
    # fmnist-short without dropout: dropout's mask draws are 14% of a CPU step here (cProfile, 2026-12-01)
    "pmean-0.2-pstd2.4-ema0.015-drop0": (["loss.P_mean=-0.2", "loss.P_std=2.4", "ema.sigma_rel=0.015",
                                          "net.dropout=0"], None),
}


def tune_and_score(cache: RowCache, runs: Path, name: str, seed: int, args, seeds, ref) -> dict:
    sets, batch = SETTINGS[name]
    batch = batch or args.batch
    steps = args.images // batch
    run = tune_run(runs / f"{name}-{steps}x{batch}-s{seed}", args.teacher, BASE[0], steps=steps, batch=batch,
                   seed=seed, overrides=[*BASE[1], *sets])
    row = consistency_rows(cache, run, f"{name}-s{seed}", seeds, ref, args.n_search)
    return {"2step_fd": row["2step"]["fd"], "1step_fd": row["1step"]["fd"], "mid_ts": row["mid_ts"],
            "train_seconds": row["train_seconds"], "steps": steps, "batch": batch, "overrides": sets}


def gamma_row(cache: RowCache, run: Path, name: str, seed: int, args, seeds, ref) -> dict:
    """2-step FD of the averaged weights with CTM's γ-sampling, mid time and γ searched together on the
    held-out seeds of the mid-time search (bench.consistency_rows)."""
    row = consistency_rows(cache, run, f"{name}-s{seed}", seeds, ref, args.n_search, gamma=True)
    return {"2step_fd": row["2step_gamma"]["fd"], "mid_ts": row["gamma_mid_ts"], "gamma": row["gamma"]}


def online_rows(run: Path, mid_ts, seeds, ref) -> dict:
    """1- and 2-step FD of the run's online (not averaged) weights, at the EMA's searched mid time."""
    D, _ = load_denoiser(run, which="net")
    return {"1step_fd": score_row(D, seeds, ref, Sampler.consistency([80.0]), label="online 1 step")["fd"],
            "2step_fd": score_row(D, seeds, ref, Sampler.consistency([80.0, *mid_ts]), label="online 2 steps")["fd"]}


def write_outputs(out: Path, results: dict, args) -> None:
    (out / "results.json").write_text(json.dumps({"command": vars(args), "base": BASE, "settings": results},
                                                 indent=1))
    lines = ["| setting | overrides | 2-step FD (seeds) | 1-step FD (seeds) | online weights, 2 / 1 step | "
             "2-step FD with γ-sampling (γ) | steps × batch |", "|---|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        r0 = next(iter(per_seed.values()))
        two = " / ".join(f"{r['2step_fd']:.1f}" for r in per_seed.values())
        one = " / ".join(f"{r['1step_fd']:.1f}" for r in per_seed.values())
        lines.append(f"| {name} | {' '.join(r0['overrides']) or '—'} | "
                     f"{np.mean([r['2step_fd'] for r in per_seed.values()]):.1f} ({two}) | "
                     f"{np.mean([r['1step_fd'] for r in per_seed.values()]):.1f} ({one}) | "
                     f"{np.mean([r['online']['2step_fd'] for r in per_seed.values()]):.1f} / "
                     f"{np.mean([r['online']['1step_fd'] for r in per_seed.values()]):.1f} | "
                     + (" / ".join(f"{r['gamma']['2step_fd']:.1f} ({r['gamma']['gamma']:g})" if "gamma" in r else "—"
                                   for r in per_seed.values()))
                     + f" | {r0['steps']} × {r0['batch']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out / "recipe_sweep.png", results, args)


def plot(path: Path, results: dict, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (name, per_seed) in enumerate(results.items()):
        two = [r["2step_fd"] for r in per_seed.values()]
        one = [r["1step_fd"] for r in per_seed.values()]
        ax.scatter(one, two, color=f"C{i % 10}", label=name)
    ax.set(xlabel="1-step FD", ylabel="2-step FD", xscale="log", yscale="log",
           title=f"{args.images / 1000:.1f}k tuning images, held-out seeds; dots = tuning seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from ectune.demo import shipped_teacher
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/sweep")
    ap.add_argument("--runs", default="runs/sweep")
    ap.add_argument("--images", type=int, default=25600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-search", type=int, default=500)
    ap.add_argument("--teacher", default=str(shipped_teacher()))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--outputs-only", action="store_true", help="write the table and plot from the settings "
                    "already cached (in a fresh clone: the committed rows) and tune nothing")
    ap.add_argument("--gamma-settings", default="ema0.015,pmean-0.2-pstd2.4-ema0.015",
                    help="settings whose γ-sampling row is computed (others show a cached one, else —)")
    args = ap.parse_args()
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        ap.error(f"unknown settings {sorted(unknown)}; choose from {', '.join(SETTINGS)}")
    torch.set_num_threads(args.threads)
    out, runs, cache = Path(args.out), Path(args.runs), RowCache(Path(args.out))
    ref, seeds = reference(), list(range(SWEEP_SEED0, SWEEP_SEED0 + args.n))
    todo = [(name, int(s)) for name in args.settings.split(",") for s in args.seeds.split(",")]
    for wait in () if args.outputs_only else (False, True):    # first what no other process is doing, then the rest
        for name, seed in todo:
            cache.get(f"setting-{name}-s{seed}", lambda: tune_and_score(cache, runs, name, seed, args, seeds, ref),
                      wait=wait)
    results: dict = {}
    for path in sorted(cache.root.glob("setting-*.json")):
        name, seed = path.stem[len("setting-"):].rsplit("-s", 1)
        if name in SETTINGS:
            r = json.loads(path.read_text())
            run = runs / f"{name}-{r['steps']}x{r['batch']}-s{seed}"
            r["online"] = cache.get(f"online-{name}-s{seed}", lambda: online_rows(run, r["mid_ts"], seeds, ref))
            if name in args.gamma_settings.split(",") or cache.has(f"gamma-{name}-s{seed}"):
                r["gamma"] = cache.get(f"gamma-{name}-s{seed}", lambda: gamma_row(cache, run, name, seed, args, seeds, ref))
            results.setdefault(name, {})[int(seed)] = r
    write_outputs(out, dict(sorted(results.items(), key=lambda kv: list(SETTINGS).index(kv[0]))), args)


if __name__ == "__main__":
    main()
