"""Sweep the demo's tuning settings at the demo's step budget (run on any device; a GPU makes it quick).

Tunes the shipped teacher for --steps iterations under each setting, then reports classifier FD of
1- and 2-step samples (EMA and online weights) and of the teacher's Heun 9/35 NFE on the same seeds.
Writes benchmarks/results/demo_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ectune.checkpoint import read_weights
from ectune.data import load_fashion_mnist
from ectune.demo import shipped_teacher, tune_config
from ectune.images import to_uint8
from ectune.metrics import classifier_features, frechet_distance, reference_stats
from ectune.models import load_denoiser, resolve_device, student_from
from ectune.sampling import sample_images
from ectune.training import train


def fd(x, ref):
    f = classifier_features(to_uint8(x))
    return float(frechet_distance(f.mean(0), np.cov(f, rowvar=False), ref[0], ref[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/demo_sweep.json")
    ap.add_argument("--settings", help="JSON list of settings to try instead of the default list")
    ap.add_argument("--mids", default="0.8,1.5,2.5", help="2-step mid times to evaluate")
    ap.add_argument("--skip-teacher", action="store_true")
    args = ap.parse_args()
    device = resolve_device(args.device)
    ref = reference_stats("test")[:2]
    seeds = list(range(args.n))
    shape = (1, 28, 28)
    teacher, t_cfg = load_denoiser(shipped_teacher(), device=device)
    results = {"steps": args.steps, "n": args.n, "device": str(device), "teacher": {}, "runs": []}
    for n_heun in () if args.skip_teacher else (2, 5, 18):
        x = sample_images(teacher, seeds, shape, sampler="heun", heun_steps=n_heun, device=device)
        results["teacher"][f"heun{2 * n_heun - 1}"] = fd(x, ref)
    print(results["teacher"], flush=True)
    ds = load_fashion_mnist()
    _, tensors, _ = read_weights(shipped_teacher())
    settings = [
        dict(name="lr1e-4", set=dict(lr=1e-4)),
        dict(name="lr3e-4", set=dict(lr=3e-4)),
        dict(name="lr1e-3", set=dict(lr=1e-3)),
        dict(name="lr3e-4_q4", set=dict(lr=3e-4), q=4.0),
        dict(name="lr3e-4_sr0.1", set=dict(lr=3e-4), sigma_rel=0.1),
        dict(name="lr3e-4_b128", set=dict(lr=3e-4), batch=128),
    ]
    if args.settings:
        settings = json.loads(args.settings)
    mids = [float(m) for m in args.mids.split(",")]
    for s in settings:
        base = tune_config(t_cfg.net, 10, 10, None, ds, device, steps=args.steps)
        cfg = replace(base, optim=replace(base.optim, **s["set"]), batch=s.get("batch", base.batch),
                      seed=s.get("seed", base.seed),
                      loss=replace(base.loss, q=s.get("q", base.loss.q), stage_iters=s.get("stage_iters", base.loss.stage_iters)),
                      ema=replace(base.ema, sigma_rel=s.get("sigma_rel", base.ema.sigma_rel)))
        D = student_from(tensors, cfg.net, "teacher")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            st = train(cfg, Path(tmp), ds, D, device=device, progress=False)
        row = {"name": s["name"], "seconds": time.perf_counter() - t0}
        for w, model in (("ema", st.ema.module.eval()), ("online", st.D.eval())):
            row[f"{w}_1step"] = fd(sample_images(model, seeds, shape, ts=(80.0,), device=device), ref)
            for mid in mids:
                row[f"{w}_2step_t{mid}"] = fd(sample_images(model, seeds, shape, ts=(80.0, mid), device=device), ref)
        print(row, flush=True)
        results["runs"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
