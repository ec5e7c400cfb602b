"""`ectune demo`: tune the shipped Fashion-MNIST teacher on a fixed budget with the recipe measured best
for such budgets (the `fmnist-short` preset: ECT with the variance-reduced r-point, `--method sct`,
ln t ~ N(−0.2, 2.4²), a power EMA of σ_rel 0.015 and 2-step γ-sampling at γ 0; benchmarks/recipe_sweep.py),
then put the teacher (DPM-Solver++(2M) at 5 NFE; with --full also 9 and 17) and the tuned model (1/2 NFE)
side by side on the same seeds.

Writes into the output folder: tune/ (the ECT run), grid.png, report.json, report.md, quality_vs_nfe.png.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .checkpoint import read_weights
from .config import NetConfig, RunConfig
from .data import load_fashion_mnist
from .errors import EctuneError
from .evaluate import reference
from .images import grid_image, to_uint8
from .models import student_from
from .presets import preset
from .report import write_report as run_report
from .runs import train_run
from .sampling import Sampler, default_consistency_times, sample_images
from .training import train

# The teacher's rows: DPM-Solver++(2M), its best few-step solver here, at 5 NFE, the budget the tuned 2 steps
# are to beat; with --full also at 9 and 17 NFE. 17 NFE is already the teacher's converged quality
# (benchmarks/results/bench, 1,000 seeds: FD 17.08 against Heun-35's 17.29); those two rows are 25% of the
# demo's time on 2 CPU cores, so the default leaves them out.
TEACHER_SAMPLERS = (Sampler.dpmpp2m(5),)
FULL_TEACHER_SAMPLERS = (Sampler.dpmpp2m(5), Sampler.dpmpp2m(9), Sampler.dpmpp2m(17))
RECIPE = {"preset": "fmnist-short", "name": "SCT"}   # = ectune tune --preset fmnist-short
DEMO_STEPS = 300                       # the fixed tuning budget: 300 × 64 images (README: the time it takes)


def shipped_teacher() -> Path:
    """Path of the Fashion-MNIST teacher that ships with ectune (EMA weights + config)."""
    return Path(str(resources.files("ectune") / "assets" / "fmnist-teacher.safetensors"))


def _seconds_per_step(cfg: RunConfig, D, ds, device, steps: int = 4) -> float:
    """Time a few ECT iterations on a throwaway copy to size the step budget (the loop's own
    images/s, so the probe's final checkpoint and grids do not count)."""
    import copy
    import tempfile
    probe = replace(cfg, steps=steps, ckpt_every=10**9, sample_every=10**9, log_every=10**9,
                    eval=replace(cfg.eval, every_kimg=0.0))
    with tempfile.TemporaryDirectory() as tmp:
        train(probe, Path(tmp), ds, copy.deepcopy(D), device=device, progress=False)
        last = json.loads((Path(tmp) / "log.jsonl").read_text().splitlines()[-1])
    return cfg.batch / last["img_per_s"]


def _forward_rate(D, device, batch: int = 250) -> float:
    """Images per second of one no-grad forward pass (sizes the evaluation)."""
    x = torch.randn(batch, 1, 28, 28, device=device)
    with torch.no_grad():
        D(x, torch.full((batch,), 1.0, device=device))
        t0 = time.perf_counter()
        D(x, torch.full((batch,), 1.0, device=device))
    return batch / (time.perf_counter() - t0)


def tune_config(teacher_net: NetConfig, minutes: float | None, n_eval: int, D, ds, device,
                steps: int | None = None, full: bool = False) -> RunConfig:
    """The fmnist-short tune preset with a step budget that fits the time left after evaluation
    (or exactly `steps` steps)."""
    cfg = preset(RECIPE["preset"], "tune")
    cfg = replace(cfg, teacher=str(shipped_teacher()), net=replace(teacher_net, dropout=cfg.net.dropout),
                  ckpt_every=100, sample_every=10**9, log_every=10)
    if steps is not None:
        return _with_steps(cfg, steps)
    eval_s = 1.1 * n_eval * eval_nfe(full) / _forward_rate(D, device)
    tune_s = minutes * 60 - eval_s - 30
    if tune_s < 30:
        raise EctuneError(f"--minutes {minutes} leaves no time to tune after evaluating {n_eval} samples; "
                         f"raise --minutes or lower --n")
    steps = int(min(tune_s / _seconds_per_step(replace(cfg, steps=8), D, ds, device), 20000))
    return _with_steps(cfg, max(steps, 8))


def _with_steps(cfg: RunConfig, steps: int) -> RunConfig:
    """`steps` iterations (in the preset's 8 stages, fixed when the run starts), with 4 in-loop
    evaluations of 200 samples (for `ectune report`; they do not touch the training stream)."""
    return replace(cfg, steps=steps, eval=replace(cfg.eval, every_kimg=steps * cfg.batch / 4000, n=200))


def _rows_to_run(mid_ts, gamma: float = 1.0, full: bool = False) -> list[tuple]:
    """(model, weights, sampler) of every row: the teacher's diffusion samplers, then 1- and 2-step
    sampling (at the recipe's γ) of the averaged tuned weights. `full` adds the teacher at 9 and 17 NFE,
    the averaged weights' 2 steps at γ = 1 (Song et al.'s fresh noise, beside CTM's γ-sampling) and the
    online weights at 1 and 2 steps (at these budgets neither is reliably the better:
    benchmarks/recipe_sweep.py)."""
    rows = [("teacher", "ema", sampler) for sampler in (FULL_TEACHER_SAMPLERS if full else TEACHER_SAMPLERS)]
    two = [default_consistency_times(2, mid_ts)]
    rows += [("tuned", "ema", Sampler.consistency([80.0])), ("tuned", "ema", Sampler.consistency(*two, gamma))]
    if not full:
        return rows
    rows += [("tuned", "ema", Sampler.consistency(*two))] if gamma != 1 else []
    return rows + [("tuned", "online", Sampler.consistency([80.0])), ("tuned", "online", Sampler.consistency(*two, gamma))]


def eval_nfe(full: bool = False) -> int:
    """Network evaluations per sample of all the demo's rows."""
    return sum(sampler.nfe for *_, sampler in _rows_to_run([1.0], 0.0, full))


def _key(model: str, weights: str, sampler: Sampler) -> tuple:
    return model, weights, sampler.nfe, sampler.gamma


def evaluate(models: dict, seeds: list[int], mid_ts, device, ref, progress=None,
             gamma: float = 1.0, full: bool = False) -> tuple[list[dict], dict]:
    """Scores (classifier features, vs `ref` = evaluate.reference()) of every row; returns rows and samples."""
    from .evaluate import score_samples
    rows, samples = [], {}
    for model, weights, sampler in _rows_to_run(mid_ts, gamma, full):
        name = f"{sampler.name}-{sampler.steps}" + (f"-gamma{sampler.gamma:g}" if sampler.gamma != 1 else "")
        row = dict(model=model, weights=weights, sampler=name, nfe=sampler.nfe,
                   **({"ts": sampler.ts, "gamma": sampler.gamma} if sampler.name == "consistency" else {}))
        t0 = time.perf_counter()
        x = sample_images(models[(model, weights)], seeds, (1, 28, 28), sampler, device=device)
        row["seconds_per_image"] = (time.perf_counter() - t0) / len(seeds)
        row.update(score_samples(x, ref), num_samples=len(seeds))
        samples[_key(model, weights, sampler)] = x[:10]
        if progress:
            progress(row)
        rows.append(row)
    return rows, samples


def comparison_grid(samples: dict, path: Path, gamma: float = 1.0) -> None:
    """Rows: the teacher's DPM-Solver++ at 17 NFE (when scored: --full) and 5 NFE, tuned 1-step, tuned
    2-step (the recipe's γ), each on seeds 0..9."""
    order = [("teacher DPM++ 17 NFE", ("teacher", "ema", 17, 1.0))] if ("teacher", "ema", 17, 1.0) in samples else []
    order += [("teacher DPM++ 5 NFE", ("teacher", "ema", 5, 1.0)),
             (f"{RECIPE['name']} 1 step", ("tuned", "ema", 1, 1.0)),
             (f"{RECIPE['name']} 2 steps", ("tuned", "ema", 2, gamma))]
    strips = [grid_image(to_uint8(samples[key]), cols=10) for _, key in order]
    label_w, (w, h) = 150, strips[0].size
    canvas = Image.new("L", (label_w + w, h * len(strips)), 255)
    draw = ImageDraw.Draw(canvas)
    for i, ((label, _), strip) in enumerate(zip(order, strips)):
        canvas.paste(strip.convert("L"), (label_w, i * h))
        draw.text((6, i * h + h // 2 - 6), label, fill=0)
    canvas = canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)
    canvas.save(path)


def write_report(out: Path, rows: list[dict], meta: dict) -> None:
    (out / "report.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = ["# ectune demo report", "", f"{meta['machine']}; tuning with {meta['recipe']} for {meta['tune_steps']} steps "
             f"({meta['tune_images']} images, {meta['tune_seconds']:.0f} s); FD in the features of ectune's "
             f"Fashion-MNIST classifier against the 10k test images, {meta['num_samples']} samples per row, "
             "same seeds in every row.", "",
             "| model | weights | sampler | NFE | FD | precision | recall | seconds/image |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['weights']} | {r['sampler']} | {r['nfe']} | {r['fd']:.2f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['seconds_per_image']:.4f} |" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(out / "quality_vs_nfe.png", rows, meta.get("gamma", 1.0))


def _plot(path: Path, rows: list[dict], gamma: float = 1.0) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    t = [r for r in rows if r["model"] == "teacher"]
    ax.plot([r["nfe"] for r in t], [r["fd"] for r in t], "o-", label="teacher (DPM-Solver++(2M))")
    for weights, mark, label in (("ema", "s-", "averaged"), ("online", "^--", "online")):
        e = [r for r in rows if r["model"] == "tuned" and r["weights"] == weights
             and not (r["nfe"] == 2 and r["gamma"] != gamma)]     # 2 steps at the recipe's γ
        if e:
            ax.plot([r["nfe"] for r in e], [r["fd"] for r in e], mark, label=f"{RECIPE['name']} ({label} weights)")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)", ylabel="FD (classifier features)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out: Path, *, minutes: float | None = None, n: int = 1000, device=torch.device("cpu"),
             progress: bool = True, log=print, steps: int | None = None, full: bool = False) -> dict:
    """The whole demo; returns the report dict. Refuses a non-demo folder; redoes a previous demo.

    The tuning budget is `steps` (default DEMO_STEPS, so every machine computes the same model),
    or, when `minutes` is given, as many steps as fit in that wall time after evaluation.
    """
    if minutes is None and steps is None:
        steps = DEMO_STEPS
    start, out = time.perf_counter(), Path(out)
    _claim_folder(out)
    ref = reference()                   # computed once per machine (cached), before the budget is sized
    t_cfg, tensors, _ = read_weights(shipped_teacher())
    teacher = student_from(tensors, t_cfg.net, "shipped teacher").to(device).eval()
    D = student_from(tensors, replace(t_cfg.net, dropout=preset(RECIPE["preset"], "tune").net.dropout),
                     "shipped teacher")
    ds = load_fashion_mnist(split="train")
    left = None if minutes is None else minutes - (time.perf_counter() - start) / 60
    cfg = tune_config(t_cfg.net, left, n, D, ds, device, steps, full)
    log(f"demo: tuning the shipped teacher with {RECIPE['name']} (--preset {RECIPE['preset']}: --method "
        f"{cfg.loss.method}, ln t ~ N({cfg.loss.P_mean:g}, {cfg.loss.P_std:g}²), EMA σ_rel {cfg.ema.sigma_rel:g}) "
        f"for {cfg.steps} steps of batch {cfg.batch}"
        + (f" (sized to finish in {minutes:g} minutes)" if steps is None else ""))
    t0 = time.perf_counter()
    state = train_run(cfg, out / "tune", ds, D, device=device, progress=progress).state
    tune_seconds = time.perf_counter() - t0
    models = {("teacher", "ema"): teacher, ("tuned", "ema"): state.ema.module.eval(),
              ("tuned", "online"): state.D.eval()}
    log(f"demo: evaluating {n} samples per row")
    rows, samples = evaluate(models, list(range(n)), cfg.sample.mid_ts, device, ref, gamma=cfg.sample.gamma, full=full,
                             progress=lambda r: log(f"  {r['model']:7s} {r['weights']:6s} {r['sampler']:14s} "
                                                    f"NFE {r['nfe']:2d}  FD {r['fd']:8.2f}"))
    comparison_grid(samples, out / "grid.png", cfg.sample.gamma)
    meta = _meta(cfg, device, n, tune_seconds, time.perf_counter() - start)
    write_report(out, rows, meta)
    run_report(out / "tune")                    # the tuning run's own report: loss with stages, last grid
    log(f"demo: done in {meta['total_seconds'] / 60:.1f} min; see {out}/report.md and {out}/grid.png")
    return {**meta, "rows": rows}


def _claim_folder(out: Path) -> None:
    """Make `out` a demo folder without a tuning run: refuse one that holds anything else."""
    if out.exists() and any(out.iterdir()) and not (out / ".ectune-demo").exists():
        raise EctuneError(f"{out} exists and holds something other than an ectune demo; choose another --out")
    shutil.rmtree(out / "tune", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".ectune-demo").write_text("folder written by `ectune demo`\n")


def _meta(cfg: RunConfig, device, n: int, tune_seconds: float, total_seconds: float) -> dict:
    return {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, device {device}",
            "recipe": f"{RECIPE['name']} (--preset {RECIPE['preset']}: --method {cfg.loss.method}, "
                      f"loss.P_mean={cfg.loss.P_mean:g}, loss.P_std={cfg.loss.P_std:g}, ema.sigma_rel={cfg.ema.sigma_rel:g}; "
                      f"2 steps at mid time "
                      f"{', '.join(f'{t:g}' for t in cfg.sample.mid_ts)}, γ {cfg.sample.gamma:g})",
            "tune_steps": cfg.steps, "tune_batch": cfg.batch, "tune_images": cfg.steps * cfg.batch,
            "tune_seconds": tune_seconds, "teacher_images": 3840000, "num_samples": n,
            "mid_ts": list(cfg.sample.mid_ts), "gamma": cfg.sample.gamma, "metric": "FD, ectune Fashion-MNIST classifier features",
            "total_seconds": total_seconds}
