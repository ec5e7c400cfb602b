"""Quality per tuning image beyond exact ECT, side by side at one budget (issue #17).

    .venv/bin/python benchmarks/beyond_ect.py --steps 400 --batch 64 --seeds 0,1 --n 1000 --n-search 500

Every recipe tunes the shipped Fashion-MNIST teacher for the same images (--steps × --batch) on each
seed; 1- and 2-step samples are scored on the same --n seeds (classifier FD against the test set),
the mid time searched on --n-search held-out seeds (ect_benchmark's search and grid); a second 2-step
row uses CTM's γ-sampling, mid time and γ searched together on the same held-out seeds. Recipes:

    ect          exact ECT (`--method ect`, the fmnist tune preset)
    sct          the variance-reduced r-point (`--method sct`, 512 reference images per iteration)
    ect-pm06     exact ECT with ln t ~ N(-0.6, 2²)
    sct-pm06     both
    sct-pm06+tcm sct-pm06 for half the steps, then TCM's second stage (`--method tcm`) for the rest
    sct-pm06-ema015  sct-pm06 with a power EMA of σ_rel 0.015 (fmnist-short's first recipe)
    sct-pm02-ps24-ema015  SCT with ln t ~ N(-0.2, 2.4²) and σ_rel 0.015: the recipe of `--preset
                 fmnist-short`, chosen by benchmarks/recipe_sweep.py on held-out seeds
    cmt          consistency mid-training alone (`--method cmt`: the teacher's 9-level DPM-Solver++
                 trajectories, each point regressed onto the trajectory's end), σ_rel 0.015 (only
                 with --recipes cmt; by default it is the first stage of the next one)
    cmt+sct-pm06-ema015  cmt for a quarter of the steps, then sct-pm06-ema015 from it for the rest
    scm          continuous-time consistency training (`--method scm`: sCT of sCM through the EDM teacher, one
                 JVP per iteration) with sCM's own CIFAR-10 time distribution, ln σ ~ N(−1.0, 1.4²)
    scm-pm02-ps24-ema015  the same with fmnist-short's time distribution and EMA

With --headline-n 10000 the --headline-recipes (exact ECT and fmnist-short's recipe) are also scored
on that many seeds (0, 1, ...; the same mid times and γ), beside their --n rows.

With --big-steps 6000 the --big-recipes are also tuned for that many steps (6,000 × 64 = 384k images, 10%
of the teacher's pretraining images) on --big-seeds, with the same rows (by default exact ECT and the
preset's recipe); the main benchmark's exact-ECT rows at that budget (benchmarks/ect_benchmark.py --budgets
...,6000) are shown beside them when its cache has them, as "ect (main benchmark)" (summary keys ect_main_*).
With --headline-n too, these rows are also scored on that many seeds.

With --curve 100,200,800 the recipes of --curve-recipes are also tuned for those step budgets (their
own stage schedules, not earlier steps of the long run) and fd_vs_images.png plots FD against tuning
images, --curve-n samples per point.

Each finished run and row is cached (runs in --runs, rows in --out/rows): run the same command again
to continue. Writes --out/results.json, --out/table.md, --out/beyond_ect.png and the issue's keys
(<method>_2step_fd, <method>_1step_fd, <method>_iter_over_edm_iter, best_method) into
benchmarks/results/summary.json, beside the main benchmark's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


from ectune.bench import LazyRun, RowCache, consistency_rows, iteration_seconds, run_facts, tune_run
from ectune.evaluate import reference

RECIPES = {
    "ect": ("ect", []),
    "sct": ("sct", []),
    "ect-pm06": ("ect", ["loss.P_mean=-0.6"]),
    "sct-pm06": ("sct", ["loss.P_mean=-0.6"]),
    "sct-pm06+tcm": ("tcm", []),            # sct-pm06 for half the steps, then TCM's second stage for the rest
    "sct-pm06-ema015": ("sct", ["loss.P_mean=-0.6", "ema.sigma_rel=0.015"]),   # fmnist-short until 2026-12-01
    "sct-pm02-ps24-ema015": ("sct", ["loss.P_mean=-0.2", "loss.P_std=2.4", "ema.sigma_rel=0.015"]),   # fmnist-short
    "cmt": ("cmt", ["ema.sigma_rel=0.015"]),  # consistency mid-training alone (the first stage below)
    "cmt+sct-pm06-ema015": ("sct", ["loss.P_mean=-0.6", "ema.sigma_rel=0.015"]),   # CMT for a quarter, then SCT
    "scm": ("scm", []),                     # continuous time, with sCM's CIFAR-10 ln σ ~ N(−1.0, 1.4²) (its recipe)
    "scm-pm02-ps24-ema015": ("scm", ["loss.P_mean=-0.2", "loss.P_std=2.4", "ema.sigma_rel=0.015"]),   # fmnist-short's
}
STAGE1 = {"sct-pm06+tcm": ("sct-pm06", 2), "cmt+sct-pm06-ema015": ("cmt", 4)}   # (first stage, 1/its share)
FIRST_STAGES_ONLY = {"cmt"}                     # not in the default --recipes: only a first stage there


def recipe_runs(runs: Path, name: str, args, seed: int, steps: int) -> tuple[LazyRun, tuple[str, LazyRun] | None]:
    """The recipe's run of `steps` on `seed`, trained on first use (and, for a two-stage recipe, the name
    and run of its first stage, of its share of the steps; the second stage has the rest)."""
    method, sets = RECIPES[name]
    if name not in STAGE1:
        return LazyRun(lambda: tune_run(runs / f"{name}-{steps}-s{seed}", args.teacher, method, steps=steps,
                                        batch=args.batch, seed=seed, overrides=sets)), None
    first, parts = STAGE1[name]
    part = steps // parts
    stage1 = LazyRun(lambda: tune_run(runs / f"{first}-{part}-s{seed}", args.teacher, RECIPES[first][0],
                                      steps=part, batch=args.batch, seed=seed, overrides=RECIPES[first][1]))
    second = LazyRun(lambda: tune_run(runs / f"{name}-{steps}-s{seed}", str(stage1.path), method,
                                      steps=steps - part, batch=args.batch, seed=seed, overrides=sets))
    return second, (f"{first}-{part}-s{seed}", stage1)


def recipe_row(cache: RowCache, runs: Path, name: str, args, seed: int, steps: int, seeds, ref) -> dict:
    """1- and 2-step rows of the recipe's run of `steps` on `seed` (images and seconds of both stages);
    the runs are trained or loaded only for rows that are not cached."""
    run, stage1 = recipe_runs(runs, name, args, seed, steps)
    tag = f"{name}-{steps}-s{seed}"
    row = consistency_rows(cache, run, tag, seeds, ref, args.n_search,   # (not the curve's)
                           gamma=name in args.gamma_recipes.split(",") and steps in (args.steps, args.big_steps))
    if stage1 is not None:
        def both():
            first = run_facts(cache, *stage1)
            return {"images": row["images"] + first["images"],
                    "train_seconds": row["train_seconds"] + first["train_seconds"]}
        total = cache.get(f"{tag}-both-stages", both)
        row = {**row, "images": total["images"], "train_seconds": total["train_seconds"]}
    return row


def stage_methods(name: str) -> list[str]:
    """The training methods of a recipe's stages (the first stage's too, for a two-stage recipe)."""
    return [RECIPES[name][0]] + ([RECIPES[STAGE1[name][0]][0]] if name in STAGE1 else [])


def ect_bench_rows(n: int, steps: int) -> dict:
    """Exact ECT's 1- and 2-step FD at `steps` × 64 images on `n` samples, from the main benchmark's row cache
    (benchmarks/ect_benchmark.py, the shipped w16 teacher, mid time searched on held-out seeds), or {}."""
    rows = Path("benchmarks/results/bench/rows")
    one, two = rows / f"n{n}-ect-w16-{steps}-1step.json", sorted(rows.glob(f"n{n}-ect-w16-{steps}-2step-mid*.json"))
    if not one.exists() or len(two) != 1:
        return {}
    return {"1step_fd": json.loads(one.read_text())["fd"], "2step_fd": json.loads(two[0].read_text())["fd"],
            "source": f"benchmarks/results/bench/rows ({one.name}, {two[0].name})"}


ROW_KINDS = ("2step", "2step_gamma", "1step")


def seed_fds(per_seed: dict, suffix: str = "") -> dict:
    """`<kind>_fd<suffix>_seeds`: the FD of each seed's row of each kind (a seed without that row left out)."""
    return {f"{k}_fd{suffix}_seeds": [r[k]["fd"] for r in per_seed.values() if k in r] for k in ROW_KINDS}


def seed_choices(per_seed: dict) -> dict:
    """The searched sampler of each seed: mid time(s), and (γ, its mid times) where γ was searched."""
    return {"gamma": {s: [r["gamma"], r["gamma_mid_ts"]] for s, r in per_seed.items() if "gamma" in r},
            "mid_ts": {s: r["mid_ts"] for s, r in per_seed.items()}}


def summarise_big(big: dict, head: dict, steps: int, batch: int, n: int, n_head: int) -> dict:
    """Per recipe of --big-recipes, its rows at `steps` (per seed; on `n_head` samples too where `head`
    has them), beside exact ECT's from the main benchmark."""
    out = {name: {"steps": steps, "images": steps * batch, "seeds": list(per_seed), **seed_fds(per_seed),
                  **(seed_fds(head[name], f"_n{n_head}") if name in head else {}),
                  **seed_choices(per_seed)} for name, per_seed in big.items()}
    ect = ect_bench_rows(n, steps)
    if ect:
        more = ect_bench_rows(n_head, steps) if n_head else {}
        out["ect (main benchmark)"] = {"steps": steps, "images": steps * batch, "seeds": [0],
                                       "2step_fd_seeds": [ect["2step_fd"]], "2step_gamma_fd_seeds": [],
                                       "1step_fd_seeds": [ect["1step_fd"]], "source": ect["source"],
                                       **({f"2step_fd_n{n_head}_seeds": [more["2step_fd"]],
                                           f"1step_fd_n{n_head}_seeds": [more["1step_fd"]]} if more else {})}
    return out


def summarise(rows: dict, cost: dict, headline: dict, n_big: int = 0) -> dict:
    """Per recipe: mean and spread over seeds of the 1- and 2-step FD, and the iteration cost; for the
    `headline` recipes the FD of each seed on their `n_big` samples too. A two-stage recipe's iteration
    cost is that of its dearer stage."""
    out = {}
    for name, per_seed in rows.items():
        big = seed_fds(headline[name], f"_n{n_big}") if name in headline else {}
        fds = seed_fds(per_seed)
        two, one, two_g = fds["2step_fd_seeds"], fds["1step_fd_seeds"], fds["2step_gamma_fd_seeds"]
        out[name] = {"2step_fd": float(np.mean(two)), "1step_fd": float(np.mean(one)), **fds,
                     "2step_gamma_fd": float(np.mean(two_g)) if len(two_g) == len(per_seed) else None,
                     **seed_choices(per_seed),
                     "train_seconds": [r["train_seconds"] for r in per_seed.values()],
                     "iter_over_edm_iter": max(cost[m] for m in stage_methods(name)) / cost["edm"], **big}
    return out


def big_table(big: dict, n_head: int = 0) -> list[str]:
    """Markdown rows of the --big-steps budget (FD per seed; with `n_head`, on that many samples too)."""
    cell = lambda vals: " / ".join(f"{v:.1f}" for v in vals) or "—"
    first = next(iter(big.values()))
    extra = f" 2-step ; γ 2-step ; 1-step FD, {n_head} samples |" if n_head else ""
    return ["", f"At {first['images']:,} tuning images ({first['steps']} steps):", "",
            "| recipe | 2-step FD | 2-step FD, γ-sampling (γ) | 1-step FD |" + extra,
            "|---|---|---|---|" + ("---|" if extra else "")] + [
        f"| {name} | {cell(r['2step_fd_seeds'])} | {cell(r['2step_gamma_fd_seeds'])}"
        f"{' (γ ' + ' / '.join(f'{g:g}' for g, _ in r['gamma'].values()) + ')' if r.get('gamma') else ''} | "
        f"{cell(r['1step_fd_seeds'])} |"
        + (" " + " ; ".join(cell(r.get(f"{k}_fd_n{n_head}_seeds", [])) for k in ROW_KINDS) + " |" if extra else "")
        for name, r in big.items()]


def write_outputs(out: Path, summary: dict, args, big_rows: dict | None = None) -> None:
    (out / "results.json").write_text(json.dumps({"command": vars(args), "recipes": summary,
                                                  **({"big": big_rows} if big_rows else {})}, indent=1))
    big = f"n{args.headline_n}"
    extra = f" 2-step ; γ 2-step ; 1-step FD, {args.headline_n} samples (seeds) |" if args.headline_n else ""
    lines = ["| recipe | 2-step FD (seeds) | 2-step FD, γ-sampling (seeds; γ) | 1-step FD (seeds) | "
             "iteration / EDM iteration |" + extra, "|---|---|---|---|---|" + ("---|" if extra else "")]
    for name, r in summary.items():
        two = " / ".join(f"{v:.1f}" for v in r["2step_fd_seeds"])
        two_g = " / ".join(f"{v:.1f}" for v in r["2step_gamma_fd_seeds"])
        gammas = " / ".join(f"{g:g}" for g, _ in r["gamma"].values())
        one = " / ".join(f"{v:.1f}" for v in r["1step_fd_seeds"])
        head = " ; ".join(" / ".join(f"{v:.1f}" for v in r[f"{k}_fd_{big}_seeds"])
                          for k in ROW_KINDS) if f"2step_fd_{big}_seeds" in r else "—"
        gamma_cell = f"{r['2step_gamma_fd']:.1f} ({two_g}; γ {gammas})" if r["2step_gamma_fd"] is not None else "—"
        lines.append(f"| {name} | {r['2step_fd']:.1f} ({two}) | {gamma_cell} | "
                     f"{r['1step_fd']:.1f} ({one}) | "
                     f"{r['iter_over_edm_iter']:.2f} |" + (f" {head} |" if extra else ""))
    lines += big_table(big_rows, args.headline_n) if big_rows else []
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    best = min(summary, key=lambda n: summary[n]["2step_fd"])
    path = Path("benchmarks/results/summary.json")
    keys = json.loads(path.read_text()) if path.exists() else {}
    for name, r in summary.items():
        key = name.replace("-", "_")
        keys.update({f"{key}_2step_fd": r["2step_fd"], f"{key}_1step_fd": r["1step_fd"],
                     **({f"{key}_2step_gamma_fd": r["2step_gamma_fd"]} if r["2step_gamma_fd"] is not None else {}),
                     f"{key}_iter_over_edm_iter": r["iter_over_edm_iter"]})
        keys.update({f"{key}_{k}_fd_{big}": float(np.mean(r[f"{k}_fd_{big}_seeds"]))
                     for k in ROW_KINDS if r.get(f"{k}_fd_{big}_seeds")})
    keys["best_method"] = best
    searched = {n: r["2step_gamma_fd"] for n, r in summary.items() if r["2step_gamma_fd"] is not None}
    if searched:                                    # by 2-step FD with γ-sampling, among the recipes searched
        keys["best_method_gamma"] = min(searched, key=searched.get)
    keys["beyond_ect_budget_images"] = args.steps * args.batch
    for name, r in (big_rows or {}).items():              # e.g. sct_pm02_ps24_ema015_2step_fd_384k (mean over seeds)
        key = name.replace(" (main benchmark)", "_main").replace("-", "_")     # (ect_main_*: the main benchmark's run)
        tag = f"{r['images'] // 1000}k"
        keys.update({f"{key}_{k}_fd_{tag}{n}": float(np.mean(r[f"{k}_fd{n}_seeds"]))
                     for k in ROW_KINDS for n in ("", f"_{big}") if r.get(f"{k}_fd{n}_seeds")})
    path.write_text(json.dumps(keys, indent=1))
    plot(out / "beyond_ect.png", summary, args)


def plot(path: Path, summary: dict, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "2step", "2 steps"), (axes[1], "1step", "1 step")):
        for i, (name, r) in enumerate(summary.items()):
            vals = r[f"{key}_fd_seeds"]
            ax.scatter([i] * len(vals), vals, color="C0")
            ax.bar(i, np.mean(vals), color="C0", alpha=0.3)
        ax.set_xticks(range(len(summary)), list(summary), rotation=20)
        ax.set_ylabel("classifier FD (lower is better)")
        ax.set_title(f"{title}, {args.steps * args.batch / 1000:.1f}k tuning images, dots = seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_curve(out: Path, curve: dict, args) -> None:
    """FD against tuning images per recipe (mean over seeds, the seeds as dots): fd_vs_images.png and
    the points in curve.json."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = {name: [{"steps": steps, "images": steps * args.batch,
                      "2step_fd_seeds": [r["2step"]["fd"] for r in per_seed.values()],
                      "1step_fd_seeds": [r["1step"]["fd"] for r in per_seed.values()],
                      "train_seconds": [r["train_seconds"] for r in per_seed.values()]}
                     for steps, per_seed in by_steps.items()] for name, by_steps in curve.items()}
    (out / "curve.json").write_text(json.dumps({"samples": args.curve_n, "points": points}, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "2step", "2 steps"), (axes[1], "1step", "1 step")):
        for i, (name, pts) in enumerate(points.items()):
            x = [p["images"] for p in pts]
            ax.plot(x, [np.mean(p[f"{key}_fd_seeds"]) for p in pts], "o-", color=f"C{i}", label=name)
            for p in pts:
                ax.scatter([p["images"]] * len(p[f"{key}_fd_seeds"]), p[f"{key}_fd_seeds"], color=f"C{i}", s=8)
        ax.set(xscale="log", yscale="log", xlabel="tuning images", ylabel="classifier FD (lower is better)",
               title=f"{title}, {args.curve_n} samples; dots = seeds")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fd_vs_images.png", dpi=120)


def main() -> None:
    from ectune.demo import shipped_teacher
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/beyond")
    ap.add_argument("--runs", default="runs/beyond")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--recipes", default=",".join(r for r in RECIPES if r not in FIRST_STAGES_ONLY))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-search", type=int, default=500)
    ap.add_argument("--gamma-recipes", default=",".join(r for r in RECIPES if r not in FIRST_STAGES_ONLY),
                    help="recipes that also get a 2-step row with γ-sampling (mid time and γ searched on held-out seeds)")
    ap.add_argument("--headline-n", type=int, default=0, help="also score the --headline-recipes on this many "
                    "samples (e.g. 10000)")
    ap.add_argument("--headline-recipes", default="ect,sct-pm02-ps24-ema015", help="exact ECT and the preset's recipe")
    ap.add_argument("--big-steps", type=int, default=0, help="also tune the --big-recipes for this many steps "
                    "(e.g. 6000: 384k images, 10%% of pretraining)")
    ap.add_argument("--big-recipes", default="ect,sct-pm02-ps24-ema015")
    ap.add_argument("--big-seeds", default="0")
    ap.add_argument("--curve", default="", help="more step budgets (e.g. 100,200,800) for the plot of FD against "
                    "tuning images, beside --steps")
    ap.add_argument("--curve-recipes", default="ect,sct-pm06", help="the recipes of that plot")
    ap.add_argument("--curve-n", type=int, default=1000, help="samples per point of that plot (the first of --n)")
    ap.add_argument("--teacher", default=str(shipped_teacher()))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per process: run recipes in "
                    "two shells with --recipes to use two cores)")
    ap.add_argument("--no-cost", action="store_true", help="skip the iteration-cost timing and the outputs "
                    "(for a process that runs while another one does: timings would be skewed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out, runs, cache = Path(args.out), Path(args.runs), RowCache(Path(args.out))
    torch.manual_seed(0)
    ref, seeds = reference(), list(range(args.n))
    budgets = [int(b) for b in args.curve.split(",") if b]
    curve_seeds = seeds[:args.curve_n]
    rows: dict = {}
    names, tuning_seeds = args.recipes.split(","), [int(s) for s in args.seeds.split(",")]
    for name in names:
        for seed in tuning_seeds:
            rows.setdefault(name, {})[seed] = recipe_row(cache, runs, name, args, seed, args.steps, seeds, ref)
    curve = {name: {steps: {seed: recipe_row(cache, runs, name, args, seed, steps, curve_seeds, ref)
                            for seed in tuning_seeds} for steps in sorted({*budgets, args.steps})}
             for name in args.curve_recipes.split(",") if budgets}
    headline = {}
    if args.headline_n:
        big = list(range(args.headline_n))
        for name in dict.fromkeys(n for n in args.headline_recipes.split(",") if n in rows):
            headline[name] = {seed: recipe_row(cache, runs, name, args, seed, args.steps, big, ref)
                              for seed in tuning_seeds}
    big_seeds = [int(s) for s in args.big_seeds.split(",")]
    big = {name: {seed: recipe_row(cache, runs, name, args, seed, args.big_steps, seeds, ref) for seed in big_seeds}
           for name in args.big_recipes.split(",")} if args.big_steps else {}
    big_head = {name: {seed: recipe_row(cache, runs, name, args, seed, args.big_steps, list(range(args.headline_n)),
                                        ref) for seed in big_seeds} for name in big} if args.headline_n else {}
    if args.no_cost:
        return
    methods = ["edm", *sorted({m for n in rows for m in stage_methods(n)})]
    cost = cache.get(f"iter-{'-'.join(methods)}-b{args.batch}",
                     lambda: iteration_seconds(args.teacher, methods, args.batch))
    write_outputs(out, summarise(rows, cost, headline, args.headline_n), args,
                  summarise_big(big, big_head, args.big_steps, args.batch, args.n, args.headline_n) if big else None)
    if budgets:
        write_curve(out, curve, args)


if __name__ == "__main__":
    main()
