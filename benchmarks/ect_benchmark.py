"""ECT against the alternatives on Fashion-MNIST, in one run on this machine (issue #3).

    .venv/bin/python benchmarks/ect_benchmark.py --n 10000 --n-compute 1000 --n-search 500 \
        --budgets 100,200,400,3000,6000 --compare 400 --inception-n 200 --teacher2 runs/teacher-w8
        # the run in the README (2026-11-26): about 5 h of CPU, two processes (run it in two shells)

--teacher2 is a teacher of another width, e.g. `ectune pretrain --preset fmnist --set net.model_channels=8
--data fashion-mnist --kimg 300 --batch 128 --out runs/teacher-w8` (the README's); without it the scaling
part has one width.

1. Quality vs NFE: the teacher with EDM Heun and DPM-Solver++(2M) at NFE 1–35 against ECT 1 and 2 steps,
   all on the same seeds (classifier FD; Inception FID on two rows).
2. Quality vs training compute: ECT, iCT from scratch and CD from the same teacher at equal budgets
   (images and wall seconds), mid times searched on held-out seeds.
3. Cost: an ECT iteration over an EDM iteration, 1-step sampling throughput over Heun-35.
4. Scaling: ECT at several budgets for two network widths, with a power law fitted on the log-log plot.

Every finished piece is cached as JSON under --out/rows, so an interrupted run continues where it
stopped (run the same command again) and a larger --n recomputes only what it changes. Results:
--out/*.json, --out/*.png, benchmarks/results/summary.json and a Markdown table (--out/table.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ectune import __version__
from ectune.bench import SHAPE, LazyRun, RowCache, consistency_rows, iteration_seconds, teacher_row, tune_run
from ectune.evaluate import reference
from ectune.models import load_denoiser
from ectune.sampling import Sampler, sample_images

HEUN_LEVELS = (1, 2, 3, 5, 9, 18)                # NFE 2N − 1: 1, 3, 5, 9, 17, 35
DPM_NFE = (1, 2, 3, 5, 9, 17, 35)


def iteration_cost(teacher: str, batch: int, iters: int = 8) -> dict:
    """Seconds per iteration of EDM pretraining and of ECT on the same network and batch."""
    sec = iteration_seconds(teacher, ("edm", "ect"), batch, iters)
    return {"edm_seconds_per_iter": sec["edm"], "ect_seconds_per_iter": sec["ect"],
            "ratio": sec["ect"] / sec["edm"], "batch": batch}


def throughput(T, E, mid_ts, n: int = 500) -> dict:
    """Seconds per image of teacher Heun-35 and of ECT 1 and 2 steps, timed back to back on the same
    seeds and batch (the quality rows are timed too, but hours apart, when the load may differ)."""
    seeds = list(range(n))
    out = {}
    for name, D, sampler in (("heun35", T, Sampler.heun(18)), ("ect_1step", E, Sampler.consistency([80.0])),
                             ("ect_2step", E, Sampler.consistency([80.0, *mid_ts]))):
        t0 = time.perf_counter()
        sample_images(D, seeds, SHAPE, sampler, batch=n)
        out[name] = (time.perf_counter() - t0) / n
    return {"seconds_per_image": out, "onestep_speedup_vs_heun35": out["heun35"] / out["ect_1step"], "n": n}


def inception_row(D, n: int, label: str, sampler: Sampler) -> dict:
    from ectune.data import load_fashion_mnist
    from ectune.evaluate import (
        inception_provenance,
        inception_reference,
        score_inception,
    )
    real = load_fashion_mnist(split="test").images[:n]
    ref = inception_reference(real)
    x = sample_images(D, list(range(n)), SHAPE, sampler, batch=250)
    return {"label": label, "n": n, "reference": f"first {n} Fashion-MNIST test images",
            **score_inception(x, ref), **inception_provenance(f"fashion-mnist test[:{n}]")}


def fit_power_law(x, y) -> tuple[float, float]:
    """y ≈ a·x^b by least squares in log-log; returns (a, b)."""
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(log_a)), float(b)


def _args():
    from ectune.demo import shipped_teacher
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/bench")
    ap.add_argument("--runs", default="runs/bench")
    ap.add_argument("--n", type=int, default=2000, help="samples per row of the teacher's samplers and of the "
                    "headline ECT rows (the issue asks 10,000)")
    ap.add_argument("--n-compute", type=int, default=None, help="samples per row of the tuning runs compared "
                    "in parts 2 and 4 (default --n); the headline ECT run is scored at both")
    ap.add_argument("--n-search", type=int, default=500, help="held-out samples per mid-time candidate")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--budgets", default="100,200,400,3000",
                    help="ECT tuning steps (scaling); the largest gives the headline numbers")
    ap.add_argument("--compare", type=int, default=400, help="tuning steps of the ECT / iCT / CD comparison")
    ap.add_argument("--widths", default="w16", help="the widths of --budgets beyond --compare (w8 runs only "
                    "the budgets up to --compare unless listed here)")
    ap.add_argument("--teacher", default=str(shipped_teacher()))
    ap.add_argument("--teacher-images", type=int, default=3_840_000, help="the teacher's pretraining images")
    ap.add_argument("--teacher2", default="runs/teacher-w8", help="a teacher of another width (scaling)")
    ap.add_argument("--inception-n", type=int, default=500)
    args = ap.parse_args()
    args.budget_list = sorted(int(b) for b in args.budgets.split(","))
    if args.compare not in args.budget_list:
        raise SystemExit(f"--compare {args.compare} must be one of --budgets {args.budget_list}")
    return args


def main() -> None:
    args = _args()
    out, runs, cache = Path(args.out), Path(args.runs), RowCache(Path(args.out))
    torch.manual_seed(0)
    ref, seeds, seeds_c = reference(), list(range(args.n)), list(range(args.n_compute or args.n))
    big, cmp_ = args.budget_list[-1], args.compare
    T, _ = load_denoiser(args.teacher)
    diffusion = diffusion_rows(cache, T, seeds, ref)                                    # 1. quality vs NFE
    second = args.teacher2 and (Path(args.teacher2).exists() or cache.has(f"n{len(seeds_c)}-teacher2-heun35"))
    teachers = {"w16": args.teacher, **({"w8": args.teacher2} if second else {})}   # (w8: its rows, if cached)
    heun35 = next(r for r in diffusion if r["family"] == "heun" and r["nfe"] == 35)
    teacher_rows = teachers_heun35(cache, T, teachers, heun35, seeds, seeds_c, ref)
    widths_budgets = {w: [b for b in args.budget_list if b <= cmp_ or w in set(args.widths.split(","))]
                      for w in teachers}
    models = tuning_rows(cache, runs, teachers, widths_budgets, args, seeds_c, ref)     # 2. + 4.
    E = LazyRun(runs / f"ect-w16-{big}")                    # loaded only for rows that are not cached
    ect = consistency_rows(cache, E, f"ect-w16-{big}", seeds, ref, args.n_search)
    cost = cache.get("iteration-cost", lambda: iteration_cost(args.teacher, args.batch))   # 3. cost
    speed = cache.get(f"throughput-{big}", lambda: throughput(T, E.denoiser, ect["mid_ts"]))
    inc = inception_rows(cache, T, E, ect["mid_ts"], args.inception_n, big)
    scaling = {w: scaling_fit(models, w, widths_budgets[w], teacher_rows[w]["fd"]) for w in teachers}
    summary = summarise(args, diffusion, heun35, ect, models, cost, speed, scaling, inc, len(seeds_c))
    (out / "results.json").write_text(json.dumps({"diffusion": diffusion, "headline": ect, "models": models,
                                                  "cost": cost, "throughput": speed, "inception": inc,
                                                  "scaling": scaling, "teachers_heun35": teacher_rows}, indent=1))
    path = Path("benchmarks/results/summary.json")           # (beside the keys other benchmarks wrote there)
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **summary}, indent=1))
    write_table(out / "table.md", diffusion, ([] if seeds_c == seeds else [(f"ect-w16-{big}", ect)])
                + list(models.items()))
    plot(out, diffusion, ect, models, scaling, big, cmp_)
    print(json.dumps(summary, indent=1))


def diffusion_rows(cache, T, seeds, ref) -> list[dict]:
    """The teacher's Heun and DPM-Solver++ rows; a second process running the same command takes the
    rows this one has not claimed (NFE <= 5 and Heun-35 first: the summary's inputs)."""
    tag = f"n{len(seeds)}"
    jobs = {f"{tag}-teacher-heun{2 * lv - 1}": ("heun", 2 * lv - 1) for lv in HEUN_LEVELS}
    jobs.update({f"{tag}-teacher-dpm{k}": ("dpmpp2m", k) for k in DPM_NFE})

    def row(name):
        return lambda: teacher_row(T, seeds, ref, *jobs[name])

    def priority(name):
        family, nfe = jobs[name]
        return (0 if nfe <= 5 else 1 if (family, nfe) == ("heun", 35) else 2, nfe)
    for name in sorted(jobs, key=priority):
        cache.get(name, row(name), wait=False)
    return [cache.get(name, row(name)) for name in jobs]


def teachers_heun35(cache, T, teachers, heun35, seeds, seeds_c, ref) -> dict:
    """Each teacher's Heun-35 row at --n-compute: the reference line of the scaling plot."""
    tag_c = f"n{len(seeds_c)}"
    rows = {"w16": heun35 if seeds_c == seeds else cache.get(
        f"{tag_c}-teacher-heun35", lambda: teacher_row(T, seeds_c, ref, "heun", 35))}
    if "w8" in teachers:
        rows["w8"] = cache.get(f"{tag_c}-teacher2-heun35", lambda: teacher_row(
            load_denoiser(teachers["w8"])[0], seeds_c, ref, "heun", 35, who="teacher w8"))
    return rows


def tuning_rows(cache, runs, teachers, widths_budgets, args, seeds_c, ref) -> dict:
    """ECT at every budget of each width, iCT and CD at --compare: their 1- and 2-step rows."""
    models = {}
    jobs = [(f"ect-{w}-{steps}", teacher, "ect", steps) for w, teacher in teachers.items()
            for steps in widths_budgets[w]]
    jobs += [(f"{m}-w16-{args.compare}", args.teacher, m, args.compare) for m in ("ict", "cd")]
    for name, teacher, method, steps in jobs:              # (trained only for rows that are not cached)
        run = LazyRun(lambda name=name, teacher=teacher, method=method, steps=steps: tune_run(
            runs / name, teacher, method, steps=steps, batch=args.batch))
        models[name] = consistency_rows(cache, run, name, seeds_c, ref, args.n_search)
    return models


def inception_rows(cache, T, E: LazyRun, mid_ts, n: int, big: int) -> dict:
    """Inception FID of ECT 2 steps and teacher Heun-35 (slow on CPU: ~8 images/s)."""
    if n <= 0:
        return {}
    return {"ect_2step": cache.get(f"inception{n}-ect-{big}-2step", lambda: inception_row(
                E.denoiser, n, "ECT 2 steps", Sampler.consistency([80.0, *mid_ts]))),
            "teacher_heun35": cache.get(f"inception{n}-teacher-heun35", lambda: inception_row(
                T, n, "teacher Heun 35 NFE", Sampler.heun(18)))}


def scaling_fit(models, width: str, budgets, teacher_fd: float) -> dict:
    """FD against tuning images of one width's ECT runs, with the power laws fitted to them."""
    rows = [models[f"ect-{width}-{b}"] for b in budgets]
    images = [m["images"] for m in rows]
    two, one = [m["2step"]["fd"] for m in rows], [m["1step"]["fd"] for m in rows]
    return {"images": images, "fd_2step": two, "fd_1step": one, "fit_2step": fit_power_law(images, two),
            "fit_1step": fit_power_law(images, one), "teacher_heun35_fd": teacher_fd}


def summarise(args, diffusion, heun35, ect, models, cost, speed, scaling, inc, n_compute: int) -> dict:
    """This benchmark's keys of benchmarks/results/summary.json. The headline run's are `ect_*_main`:
    `ect_1step_fd`, `ect_2step_fd` and `ect_iter_over_edm_iter` are beyond_ect.py's (every method at its
    compare budget, issue #17)."""
    cmp_ = args.compare
    return {
        "teacher_heun35_fd": heun35["fd"],
        "ect_1step_fd_main": ect["1step"]["fd"],
        "ect_2step_fd_main": ect["2step"]["fd"],
        "best_diffusion_fd_nfe_le5": min(r["fd"] for r in diffusion if r["nfe"] <= 5),
        "ict_2step_fd_equal_budget": models[f"ict-w16-{cmp_}"]["2step"]["fd"],
        "cd_2step_fd_equal_budget": models[f"cd-w16-{cmp_}"]["2step"]["fd"],
        "ect_2step_fd_equal_budget": models[f"ect-w16-{cmp_}"]["2step"]["fd"],
        "equal_budget_images": cmp_ * args.batch,
        "tune_images_over_pretrain_images": ect["images"] / args.teacher_images,
        "ect_iter_over_edm_iter_main": cost["ratio"],
        "onestep_speedup_vs_heun35": speed["onestep_speedup_vs_heun35"],
        "cd_train_seconds_over_ect": (models[f"cd-w16-{cmp_}"]["train_seconds"]
                                      / models[f"ect-w16-{cmp_}"]["train_seconds"]),
        "ect_2step_fd_power_law_exponent": scaling["w16"]["fit_2step"][1],
        "metric": "FD in ectune's Fashion-MNIST classifier features vs the 10k test images (floor 0.73)",
        "samples_per_row": args.n,
        "samples_per_row_compute_and_scaling": n_compute,
        "inception_fid": {k: v["fid"] for k, v in inc.items()},
        "command": "python benchmarks/ect_benchmark.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "budget_list"),
        "date": time.strftime("%Y-%m-%d"), "ectune_version": __version__,
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    }


def write_table(path: Path, diffusion, models) -> None:
    lines = ["| model | sampler | NFE | training images | train s | samples | FD ↓ | precision | recall | s / image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in diffusion:
        lines.append(f"| teacher | {r['family']} | {r['nfe']} | – | – | {r['n']:,} | {r['fd']:.1f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['seconds_per_image']:.4f} |")
    for name, m in models:
        for k, nfe in (("1step", 1), ("2step", 2)):
            r = m[k]
            sampler = "1 step" if nfe == 1 else f"2 steps, mid {m['mid_ts'][0]:.3g}"
            lines.append(f"| {name} | {sampler} | {nfe} | {m['images']:,} | {m['train_seconds']:.0f} | {r['n']:,} | "
                         f"{r['fd']:.1f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['seconds_per_image']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(out: Path, diffusion, ect, models, scaling, big, cmp_) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for fam, style in (("heun", "o-"), ("dpmpp2m", "s-")):
        rows = sorted((r for r in diffusion if r["family"] == fam), key=lambda r: r["nfe"])
        ax[0].plot([r["nfe"] for r in rows], [r["fd"] for r in rows], style, label=f"teacher {fam}")
    for name, marker in ((f"ect-w16-{big}", "*"), (f"ect-w16-{cmp_}", "P"), (f"cd-w16-{cmp_}", "^"),
                         (f"ict-w16-{cmp_}", "v")):
        m = ect if name == f"ect-w16-{big}" else models[name]
        label = f"{name} (n={m['1step']['n']:,})" if m["1step"]["n"] != diffusion[0]["n"] else name
        ax[0].plot([1, 2], [m["1step"]["fd"], m["2step"]["fd"]], marker, ms=12, label=label)
    ax[0].set(xscale="log", yscale="log", xlabel="NFE", ylabel="classifier FD", title="quality vs NFE")
    ax[0].legend(fontsize=8)
    for width, sc in scaling.items():
        x = np.array(sc["images"], dtype=float)
        for key, style in (("fd_2step", "o"), ("fd_1step", "s")):
            a, b = sc["fit_" + key[3:]]
            ax[1].plot(x, sc[key], style, label=f"ECT {width} {key[3:]} (fit ∝ C^{b:.2f})")
            xx = np.geomspace(x.min(), x.max(), 20)
            ax[1].plot(xx, a * xx ** b, "--", color=ax[1].lines[-1].get_color())
        ax[1].axhline(sc["teacher_heun35_fd"], ls=":", color="gray")
        ax[1].annotate(f"teacher {width} Heun-35", (x.min(), sc["teacher_heun35_fd"]), fontsize=7, color="gray")
    ax[1].set(xscale="log", yscale="log", xlabel="tuning images", ylabel="classifier FD", title="ECT scaling")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "benchmark.png", dpi=120)


if __name__ == "__main__":
    main()
