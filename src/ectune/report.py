"""`ectune report RUN`: a run folder as report.md with plots, for a person to look at.

    loss.png     training loss against images seen, ECT stage boundaries marked
    quality.png  in-loop FD against images seen (metrics.jsonl), one line per sampler and weights
    report.md    the run's cost (images, iterations, stages, seconds), the last scores, the config's
                 differences from its preset, and the last sample grid
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import RunConfig, read_config
from .errors import EctuneError
from .presets import preset


def read_records(path: Path) -> list[dict]:
    """The JSON records of a log.jsonl / metrics.jsonl (torn lines skipped); [] when it is absent."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue                                   # a torn last line
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def train_seconds(cfg: RunConfig, log: list[dict]) -> float:
    """Compute seconds of a (possibly resumed) run, from its logged throughput."""
    total, prev = 0.0, 0
    for r in log:
        if r["step"] > prev and r.get("img_per_s"):
            total += (r["step"] - prev) * cfg.batch / r["img_per_s"]
        prev = r["step"]
    return total


def config_diff(cfg: RunConfig) -> list[tuple[str, object, object]]:
    """(key, preset value, run value) for every field where the run differs from its preset."""
    try:
        base = dataclasses.asdict(preset(cfg.preset, cfg.kind))
    except EctuneError:
        return []
    out = []

    def walk(a, b, prefix):
        for k in sorted(set(a) | set(b)):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, f"{prefix}{k}.")
            elif va != vb:
                out.append((prefix + k, va, vb))
    walk(base, dataclasses.asdict(cfg), "")
    return out


def _stage_bounds(cfg: RunConfig, log: list[dict]) -> list[float]:
    """kimg at which a new ECT stage starts (from the logged stage; the frozen stage length otherwise)."""
    bounds, last = [], None
    for r in log:
        if "stage" in r and last is not None and r["stage"] != last:
            first = (r["stage"] * cfg.loss.stage_iters) if cfg.loss.stage_iters else r["step"]
            bounds.append(first * cfg.batch / 1000)
        last = r.get("stage", last)
    return bounds


def _plots(run: Path, cfg: RunConfig, log: list[dict], metrics: list[dict]) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        raise EctuneError("ectune report draws with matplotlib: pip install 'ectune[metrics]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    if log:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([r["kimg"] for r in log], [r["loss"] for r in log], lw=1)
        for i, b in enumerate(_stage_bounds(cfg, log)):
            ax.axvline(b, color="grey", ls=":", lw=1, label="ECT stage boundary" if i == 0 else None)
        ax.set(xlabel="training images (thousands)", ylabel="loss", yscale="log", title=f"{run.name}: loss")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(run / "loss.png", dpi=110)
        plt.close(fig)
        made.append("loss.png")
    if metrics:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key in sorted({(m["sampler"], m["weights"]) for m in metrics}):
            pts = [m for m in metrics if (m["sampler"], m["weights"]) == key]
            ax.plot([m["kimg"] for m in pts], [m["fd"] for m in pts], marker="o", label=f"{key[0]} ({key[1]})")
        ax.set(xlabel="training images (thousands)", ylabel=f"{metrics[-1]['metric']} FD (lower is better)",
               yscale="log", title=f"{run.name}: quality during training (n = {metrics[-1]['n']})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run / "quality.png", dpi=110)
        plt.close(fig)
        made.append("quality.png")
    return made


def write_report(run) -> Path:
    """Write RUN/report.md (+ loss.png, quality.png); returns the report's path."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise EctuneError(f"{run} is not a run folder (no config.json); pass the --out of a pretrain or tune run")
    cfg = read_config(run / "config.json")
    log, metrics = read_records(run / "log.jsonl"), read_records(run / "metrics.jsonl")
    plots = _plots(run, cfg, log, metrics)
    done = log[-1]["step"] if log else 0
    lines = [f"# {run.name}: {cfg.kind} ({cfg.loss.method}), preset {cfg.preset}", "",
             f"- data {cfg.data or '(none recorded)'}; teacher {cfg.teacher or '(none)'}",
             f"- {done:,} of {cfg.steps:,} iterations × batch {cfg.batch} = {done * cfg.batch:,} images; "
             f"{train_seconds(cfg, log):,.0f} s of training", ""]
    if cfg.loss.method in ("ect", "sct", "cd") and cfg.loss.stage_iters:
        lines[-1:] = [f"- ECT stages of {cfg.loss.stage_iters:,} iterations (q = {cfg.loss.q:g}); "
                      f"last logged stage {log[-1].get('stage', '?') if log else '?'}", ""]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    last = [m for m in metrics if m["step"] == metrics[-1]["step"]] if metrics else []
    if last:
        lines += [f"## Quality at step {last[0]['step']:,} ({last[0]['metric']}, n = {last[0]['n']})", "",
                  "| sampler | weights | NFE | FD |", "|---|---|---|---|"]
        lines += [f"| {m['sampler']} | {m['weights']} | {m['nfe']} | {m['fd']:.2f} |" for m in last] + [""]
    diff = config_diff(cfg)
    lines += [f"## Config against preset {cfg.preset} ({cfg.kind})", ""]
    lines += (["| key | preset | run |", "|---|---|---|"] + [f"| {k} | {a} | {b} |" for k, a, b in diff]
              if diff else ["(the preset unchanged)"]) + [""]
    grids = sorted((run / "samples").glob("*.png"), key=lambda p: (p.stem.rsplit("-", 1)[-1], p.stem))
    if grids:
        lines += [f"## Last sample grid: {grids[-1].name}", "", f"![{grids[-1].name}](samples/{grids[-1].name})", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
