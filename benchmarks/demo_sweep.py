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

from ectune.checkpoint import read_weights
from ectune.data import load_fashion_mnist
from ectune.demo import shipped_teacher, tune_config
from ectune.evaluate import fd_only, reference
from ectune.models import load_denoiser, resolve_device, student_from
from ectune.runs import train_run
from ectune.sampling import Sampler, sample_images

SHAPE = (1, 28, 28)
SETTINGS = [
    dict(name="lr1e-4", set=dict(lr=1e-4)),
    dict(name="lr3e-4", set=dict(lr=3e-4)),
    dict(name="lr1e-3", set=dict(lr=1e-3)),
    dict(name="lr3e-4_q4", set=dict(lr=3e-4), q=4.0),
    dict(name="lr3e-4_sr0.1", set=dict(lr=3e-4), sigma_rel=0.1),
    dict(name="lr3e-4_b128", set=dict(lr=3e-4), batch=128),
]


def _args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/demo_sweep.json")
    ap.add_argument("--settings", help="JSON list of settings to try instead of the default list")
    ap.add_argument("--mids", default="0.8,1.5,2.5", help="2-step mid times to evaluate")
    ap.add_argument("--skip-teacher", action="store_true")
    return ap.parse_args()


def main():
    args = _args()
    device, ref, seeds = resolve_device(args.device), reference(), list(range(args.n))
    teacher, t_cfg = load_denoiser(shipped_teacher(), device=device)
    results = {"steps": args.steps, "n": args.n, "device": str(device), "teacher": {}, "runs": []}
    for n_heun in () if args.skip_teacher else (2, 5, 18):
        x = sample_images(teacher, seeds, SHAPE, Sampler.heun(n_heun), device=device)
        results["teacher"][f"heun{2 * n_heun - 1}"] = fd_only(x, ref)
    print(results["teacher"], flush=True)
    ds, (_, tensors, _) = load_fashion_mnist(), read_weights(shipped_teacher())
    mids = [float(m) for m in args.mids.split(",")]
    for s in json.loads(args.settings) if args.settings else SETTINGS:
        row = tune_and_score(s, t_cfg, tensors, ds, device, args.steps, seeds, ref, mids)
        print(row, flush=True)
        results["runs"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


def tune_and_score(s: dict, t_cfg, tensors, ds, device, steps: int, seeds, ref, mids) -> dict:
    """The demo's run with one setting changed (in a temporary folder), scored at 1 and 2 steps."""
    base = tune_config(t_cfg.net, 10, 10, None, ds, device, steps=steps)
    cfg = replace(base, optim=replace(base.optim, **s["set"]), batch=s.get("batch", base.batch),
                  seed=s.get("seed", base.seed),
                  loss=replace(base.loss, q=s.get("q", base.loss.q), stage_iters=s.get("stage_iters", base.loss.stage_iters)),
                  ema=replace(base.ema, sigma_rel=s.get("sigma_rel", base.ema.sigma_rel)))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        st = train_run(cfg, Path(tmp) / "run", ds, student_from(tensors, cfg.net, "teacher"), device=device,
                       progress=False).state
    row = {"name": s["name"], "seconds": time.perf_counter() - t0}
    for w, model in (("ema", st.ema.module.eval()), ("online", st.D.eval())):
        row[f"{w}_1step"] = fd_only(sample_images(model, seeds, SHAPE, Sampler.consistency([80.0]), device=device), ref)
        for mid in mids:
            row[f"{w}_2step_t{mid}"] = fd_only(sample_images(model, seeds, SHAPE, Sampler.consistency([80.0, mid]),
                                                             device=device), ref)
    return row


if __name__ == "__main__":
    main()
