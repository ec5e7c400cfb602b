"""Watching a run while it goes: quality measured in the loop (metrics.jsonl) and TensorBoard.

* In-loop evaluation (config section ``eval``): every ``eval.every_kimg`` thousand training images
  and at the last step, ``eval.n`` samples on seeds 0..n-1 are scored with the run's metric, from the
  EMA weights (and the online ones with ``eval.weights=both``): 1 and 2 consistency steps at the
  stored mid time for a tuning run, Heun at ``sample.heun_steps`` for pretraining. It runs on rank 0
  before the checkpoint of its step, under a forked RNG, so the training stream is not touched and a
  resumed run (whose rows after its checkpoint are dropped) has every row exactly once.
* TensorBoard (``engine.tensorboard``): loss, learning rate, ECT stage and Δt/t quantiles, images/s,
  non-finite skips, the in-loop scores and the sample grids, under RUN/tensorboard. "auto" writes them
  when the ``tensorboard`` package is installed (``pip install 'ectune[tensorboard]'``) and imports
  nothing otherwise; no network access is made.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

from .config import RunConfig
from .errors import EctuneError
from .progress import Progress
from .sampling import Sampler, default_consistency_times, sample_images, seed_labels

METRICS_FILE = "metrics.jsonl"


def eval_due(cfg: RunConfig, step: int) -> bool:
    """Whether iteration `step` (1-based count of finished steps) ends with an in-loop evaluation."""
    every = cfg.eval.every_kimg * 1000
    if every <= 0:
        return False
    return step == cfg.steps or int(step * cfg.batch // every) > int((step - 1) * cfg.batch // every)


def eval_fits(cfg: RunConfig) -> bool:
    """Whether the in-loop metric fits the run's data (the classifier metric: Fashion-MNIST only)."""
    from .evaluate import is_fashion_mnist
    shape = cfg.net.image_shape
    return cfg.eval.metric != "classifier" or (shape == (1, 28, 28) and is_fashion_mnist(cfg.data))


def check_eval(cfg: RunConfig) -> None:
    """Refuse at start an in-loop metric that does not fit the run's data (before anything is written)."""
    if cfg.eval.every_kimg <= 0:
        return
    shape = cfg.net.image_shape
    if cfg.eval.metric == "classifier":
        if not eval_fits(cfg):
            raise EctuneError(f"eval.metric=classifier scores against Fashion-MNIST, but this run trains on "
                              f"{cfg.data or 'unrecorded data'} {shape}; use --set eval.metric=inception or turn "
                              "in-loop evaluation off with --set eval.every_kimg=0")
    if cfg.engine.tensorboard == "on" and not have_tensorboard():
        raise EctuneError("engine.tensorboard=on needs the tensorboard package: pip install 'ectune[tensorboard]' "
                          "(or --set engine.tensorboard=auto)")


def run_samplers(cfg: RunConfig) -> list[Sampler]:
    """The samplers that show how a run is doing (in-loop rows, sample grids): Heun at sample.heun_steps
    for pretraining; 1 and 2 consistency steps at the config's mid time for tuning."""
    if cfg.kind == "pretrain":
        return [Sampler.heun(cfg.sample.heun_steps)]
    return [Sampler.consistency(default_consistency_times(steps, cfg.sample.mid_ts, cfg.sample.t_max), cfg.sample.gamma)
            for steps in (1, 2)]


class Monitor:
    """The in-loop evaluation and TensorBoard writer of one run (rank 0 only)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, device, *, progress: bool = True):
        self.cfg, self.run_dir, self.device, self.progress = cfg, Path(run_dir), device, progress
        self._ref = None
        self.tb = _tensorboard_writer(cfg, self.run_dir)

    def reference(self):
        """The run's metric and its reference (the run's data, its test split), made once."""
        if self._ref is None:
            from .evaluate import metric
            scorer = metric(self.cfg.eval.metric, device=self.device)
            self._ref = scorer, scorer.reference(self.cfg, self.run_dir)
        return self._ref

    def evaluate(self, s, started: float) -> list[dict]:
        """Score the run's weights at this step; rows appended to metrics.jsonl (and TensorBoard)."""
        cfg, seeds = self.cfg, list(range(self.cfg.eval.n))
        shape = cfg.net.image_shape
        labels = seed_labels(seeds, cfg.net.label_dim)
        models = [("ema", s.ema.module)] + ([("net", s.D)] if cfg.eval.weights == "both" else [])
        samplers = run_samplers(cfg)
        rows = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                Progress(len(models) * len(samplers) * len(seeds), f"in-loop eval at step {s.step}",
                         bar=self.progress is True) as bar:
            for weights, D in models:
                was_training = D.training
                D.eval()
                for sampler in samplers:
                    x = sample_images(D, seeds, shape, sampler, class_labels=labels, device=self.device, progress=bar)
                    rows.append(self._row(s, started, weights, f"{sampler.name}-{sampler.steps}", sampler.nfe,
                                          self._score(x)))
                D.train(was_training)
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for r in rows:
            self.scalar(f"eval/{r['metric']}_{r['weights']}_{r['sampler']}", r["fd"], s.step)
        return rows

    def _score(self, x) -> float:
        scorer, ref = self.reference()
        return scorer.distance(x, ref)

    def _row(self, s, started, weights, sampler, nfe, fd) -> dict:
        return {"step": s.step, "kimg": s.step * self.cfg.batch / 1000, "wall_s": round(time.time() - started, 3),
                "time": time.time(), "metric": self.cfg.eval.metric, "weights": weights, "sampler": sampler,
                "nfe": nfe, "n": self.cfg.eval.n, "fd": fd}

    def scalar(self, tag: str, value, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, float(value), step)

    def log(self, rec: dict) -> None:
        """The training log record of a step, as TensorBoard scalars."""
        if self.tb is None:
            return
        for key in ("loss", "lr", "img_per_s", "nonfinite_skipped", "stage", "levels"):
            if key in rec:
                self.scalar(f"train/{key}", rec[key], rec["step"])
        for q, v in (rec.get("dt_over_t") or {}).items():
            self.scalar(f"train/dt_over_t_{q}", v, rec["step"])

    def grid(self, path: Path, step: int) -> None:
        """A written sample grid (PNG) as a TensorBoard image."""
        if self.tb is None or not Path(path).is_file():
            return
        import numpy as np
        from PIL import Image
        img = np.asarray(Image.open(path).convert("RGB"))
        self.tb.add_image(f"samples/{Path(path).name.split('-')[0]}", img, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def have_tensorboard() -> bool:
    """Whether the optional tensorboard package is installed (looked up, not imported)."""
    return importlib.util.find_spec("tensorboard") is not None


def _tensorboard_writer(cfg: RunConfig, run_dir: Path):
    """A SummaryWriter under RUN/tensorboard, or None (off, or "auto" without the package)."""
    mode = cfg.engine.tensorboard
    if mode == "off" or (mode == "auto" and not have_tensorboard()):
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop the in-loop rows after `step` (made after the checkpoint a run resumes from)."""
    from .checkpoint import trim_log
    trim_log(run_dir, step, name=METRICS_FILE)
