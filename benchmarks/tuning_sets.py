"""Tuning without the original data (issue #7): ECT tuned at equal budget on the real training set,
on teacher-generated sets of two sizes, and on a class subset; 1- and 2-step quality measured
against the real test set.

    .venv/bin/python benchmarks/tuning_sets.py                           # sizes 10k and 60k, DPM-Solver++ 9 NFE
    .venv/bin/python benchmarks/tuning_sets.py --sizes 2000 --steps 50   # a quick look

Teacher samples come from `ectune synth` (sharded and resumable: run the same command again after an
interruption), by default with DPM-Solver++(2M) at 9 NFE: classifier FD 20.4 against Heun-35's 17.3 in
the main benchmark, at a quarter of the cost (`--synth heun` for Heun with 35 NFE). Every finished
piece is cached under --out/rows as in ect_benchmark.py. The real-data row is the main benchmark's run of
the same settings when --real-run names it (training is deterministic, so retraining would repeat it).
Results: --out/results.json and --out/table.md.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np

from ectune.bench import LazyRun, RowCache, consistency_rows, score_row, tune_run
from ectune.data import load_dataset
from ectune.evaluate import Reference, reference, score_samples
from ectune.images import from_uint8
from ectune.models import resolve_device
from ectune.sampling import Sampler
from ectune.synth import synthesize


def subset_reference(classes: str) -> Reference:
    """The classifier-feature statistics of the test images of `classes`, as `reference()` gives them."""
    from ectune.metrics import classifier_features
    f = classifier_features(load_dataset(f"fashion-mnist[classes={classes}]", split="test").images)
    return Reference(f.mean(0), np.cov(f, rowvar=False), f, {"reference": f"fashion-mnist test[classes={classes}]"})


def reusable(args) -> bool:
    """Whether --real-run is a finished ECT run on the real data from this teacher with these settings."""
    path = Path(args.real_run or "") / "config.json"
    if not args.real_run or not path.exists():
        return False
    cfg = json.loads(path.read_text())
    return (cfg["loss"]["method"], cfg["data"], cfg["steps"], cfg["batch"], Path(cfg["teacher"]).resolve()) == (
        "ect", "fashion-mnist", args.steps, args.batch, Path(args.teacher).resolve())


def _args():
    from ectune.demo import shipped_teacher
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/tuning_sets")
    ap.add_argument("--runs", default="runs/tuning_sets")
    ap.add_argument("--teacher", default=str(shipped_teacher()))
    ap.add_argument("--sizes", default="10000,60000", help="teacher-sample set sizes")
    ap.add_argument("--synth", choices=["dpmpp2m", "heun"], default="dpmpp2m", help="the teacher's sampler")
    ap.add_argument("--nfe", type=int, default=9, help="synth NFE (Heun: odd, 2N - 1 for N levels)")
    ap.add_argument("--real-run", default="runs/bench/ect-w16-400",
                    help="an existing ECT run on the real data with these --steps and --batch, reused")
    ap.add_argument("--subset", default="0,2,4,6,8", help="classes of the class-subset tuning set")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=1000, help="samples per evaluated row")
    ap.add_argument("--n-search", type=int, default=500)
    return ap.parse_args()


def main() -> None:
    args = _args()
    out, runs = Path(args.out), Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    cache, ref, seeds = RowCache(out), reference(), list(range(args.n))
    sets = [("real", "fashion-mnist", None),
            (f"subset-{args.subset.replace(',', '')}", f"fashion-mnist[classes={args.subset}]", None)]
    sets += [(f"synth-{size}", str(runs / f"synth-{size}-{args.synth}{args.nfe}.npz"), size)
             for size in sorted(int(s) for s in args.sizes.split(","))]
    rows = {name: set_rows(args, cache, ref, seeds, name, data, size) for name, data, size in sets}   # smallest first
    write_outputs(out, args, rows)


def set_rows(args, cache, ref, seeds, name: str, data: str, size: int | None) -> dict:
    """One tuning set: made by the teacher's sampler if `size` is given, its own quality (its first
    --n images), ECT tuned on it and its 1- and 2-step rows (a class subset: also against its classes).
    The set is made and loaded, and the run trained, only for rows that are not cached."""
    @functools.cache
    def dataset():
        if size is not None:
            how = {"nfe": args.nfe} if args.synth == "dpmpp2m" else {"num_steps": (args.nfe + 1) // 2}
            synthesize(args.teacher, data, n=size, seed=2_000_000, batch=128, device=resolve_device("auto"),
                       progress=False, sampler=args.synth, **how)
        return load_dataset(data)
    first = lambda: from_uint8(dataset().images[:args.n])     # noqa: E731
    own = cache.get(f"n{args.n}-set-{name}", lambda: score_samples(first(), ref))
    set_size = cache.get(f"set-{name}-size", lambda: {"set_size": len(dataset())})["set_size"]

    def trained() -> Path:
        if name == "real" and reusable(args):
            return Path(args.real_run)
        dataset()                               # (a teacher-sampled set is made first)
        return tune_run(Path(args.runs) / f"ect-{name}-{args.steps}", args.teacher, "ect", steps=args.steps,
                        batch=args.batch, data=data)
    run = LazyRun(trained)
    row = {"data": data, "set_fd": own["fd"], "set_size": set_size,
           **consistency_rows(cache, run, f"{name}-{args.steps}", seeds, ref, args.n_search)}
    if name.startswith("subset-"):
        sub_ref, mid = functools.cache(lambda: subset_reference(args.subset)), row["mid_ts"]
        tag = f"n{args.n}-{name}-{args.steps}"
        row["vs_subset_test"] = {
            "set": cache.get(f"n{args.n}-set-{name}-vs-subset", lambda: score_samples(first(), sub_ref())),
            "1step": cache.get(f"{tag}-1step-vs-subset", lambda: score_row(
                run.denoiser, seeds, sub_ref(), Sampler.consistency([80.0]), label=f"{name} 1 step vs its classes")),
            "2step": cache.get(f"{tag}-2step-mid{mid[0]:.4g}-vs-subset", lambda: score_row(
                run.denoiser, seeds, sub_ref(), Sampler.consistency([80.0, *mid]), label=f"{name} 2 steps vs its classes"))}
    return row


def write_outputs(out: Path, args, rows: dict) -> None:
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = ["| tuning set | set size | set's own FD | images seen | 1-step FD | 2-step FD (mid) | 2-step precision "
             "| 2-step recall |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} (`{Path(r['data']).name}`) | {r['set_size']:,} | {r['set_fd']:.1f} | {r['images']:,} | "
                     f"{r['1step']['fd']:.1f} | "
                     f"{r['2step']['fd']:.1f} ({r['mid_ts'][0]:.3g}) | {r['2step']['precision']:.3f} | "
                     f"{r['2step']['recall']:.3f} |")
    for name, r in rows.items():
        if "vs_subset_test" in r:
            v = r["vs_subset_test"]
            lines.append(f"\nAgainst the test images of its own classes only, {name}: the set itself "
                         f"{v['set']['fd']:.1f}, ECT 1 step {v['1step']['fd']:.1f}, 2 steps {v['2step']['fd']:.1f}.")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
