"""The thin training loop shared by `pretrain` (EDM loss) and `tune` (ECT loss).

One iteration: draw a batch → per-sample loss → mean → backward → finite check → lr → step → EMA.
Checkpoints carry everything needed to continue: weights, EMA, optimizer, RNG and data position.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import RunConfig
from .data import BatchSampler, ImageDataset
from .ema import EMA
from .errors import EctuneError
from .images import save_samples
from .losses import ect_loss, edm_loss
from .sampling import default_consistency_times, sample_images
from .schedules import ect_r, ect_stage, lognormal_sigma


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps)
    if o.name == "radam":
        return torch.optim.RAdam(params, lr=o.lr, betas=o.betas, eps=o.eps)
    raise EctuneError(f"unknown optimizer {o.name!r}; use optim.name=adam or radam")


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate of iteration `step` (0-based): linear warm-up, then optional inverse-sqrt decay."""
    o = cfg.optim
    lr = o.lr
    if o.warmup_steps > 0:
        lr *= min((step + 1) / o.warmup_steps, 1.0)
    if o.lr_ref_steps > 0:
        lr /= math.sqrt(max(step / o.lr_ref_steps, 1.0))
    return lr


def batch_loss(cfg: RunConfig, D, x0, labels, step: int, gen: torch.Generator):
    """Per-sample loss (B,) of iteration `step` and a dict of what to log (e.g. the ECT stage)."""
    L, B = cfg.loss, x0.shape[0]
    sigma = lognormal_sigma(B, L.P_mean, L.P_std, generator=gen, device=x0.device)
    noise = torch.randn(x0.shape, generator=gen, device=x0.device)
    if L.method == "edm":
        return edm_loss(D, x0, sigma, noise, sigma_data=cfg.net.sigma_data, class_labels=labels), {}
    if L.method == "ect":
        stage = ect_stage(step, cfg.stage_iters)
        r = ect_r(sigma, stage, q=L.q, k=L.k, b=L.b)
        loss = ect_loss(D, x0, sigma, r, noise, c=L.c, weighting=L.weighting,
                        sigma_data=cfg.net.sigma_data, class_labels=labels)
        return loss, {"stage": stage}
    raise EctuneError(f"unknown loss.method {L.method!r}; use edm or ect")


@dataclass
class TrainState:
    """What moves between iterations and into checkpoints."""
    D: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    sampler: BatchSampler
    gen: torch.Generator
    step: int = 0
    nonfinite_total: int = 0
    stop_requested: bool = False


def state_tensors(s: TrainState) -> dict[str, torch.Tensor]:
    out = {f"net.{k}": v for k, v in s.D.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in s.ema.module.state_dict().items()})
    return out


def save(run_dir: Path, cfg: RunConfig, s: TrainState) -> Path:
    train_state = {
        "step": s.step, "optimizer": s.opt.state_dict(), "sampler": s.sampler.state_dict(),
        "gen": s.gen.get_state(), "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if s.gen.device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
        "nonfinite_total": s.nonfinite_total,
    }
    return ckpt.save_checkpoint(run_dir, s.step, cfg, state_tensors(s), train_state, keep=cfg.keep_ckpts)


def restore(ckpt_dir: Path, s: TrainState) -> None:
    """Load the latest checkpoint of a run into `s` (weights, EMA, optimizer, RNG, data position)."""
    _, tensors, _ = ckpt.read_weights(ckpt_dir / "model.safetensors")
    ckpt.load_state_checked(s.D, ckpt.split_prefix(tensors, "net"), str(ckpt_dir))
    ckpt.load_state_checked(s.ema.module, ckpt.split_prefix(tensors, "ema"), str(ckpt_dir))
    st = ckpt.read_train_state(ckpt_dir)
    s.opt.load_state_dict(st["optimizer"])
    s.sampler.load_state_dict(st["sampler"])
    s.gen.set_state(st["gen"])
    torch.set_rng_state(st["cpu_rng"])
    if st["cuda_rng"].numel() and s.gen.device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda_rng"])
    s.step, s.nonfinite_total = int(st["step"]), int(st["nonfinite_total"])


def grads_finite(params) -> bool:
    norms = [p.grad.detach().abs().max() for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def write_grid(run_dir: Path, cfg: RunConfig, s: TrainState, shape) -> None:
    """Interval sample grids from the EMA weights: Heun for pretraining, 1- and 2-step for tuning."""
    seeds = list(range(cfg.sample.grid))
    D, dev = s.ema.module, s.gen.device
    labels = torch.tensor(seeds) % cfg.net.label_dim if cfg.net.label_dim else None
    if cfg.kind == "pretrain":
        x = sample_images(D, seeds, shape, sampler="heun", heun_steps=cfg.sample.heun_steps,
                          class_labels=labels, device=dev)
        save_samples(x, run_dir / "samples" / f"heun{cfg.sample.heun_steps}-{s.step:08d}.png")
        return
    for steps in (1, 2):
        ts = default_consistency_times(steps, cfg.sample.mid_ts, cfg.sample.t_max)
        x = sample_images(D, seeds, shape, ts=ts, class_labels=labels, device=dev)
        save_samples(x, run_dir / "samples" / f"{steps}step-{s.step:08d}.png")


def train(cfg: RunConfig, run_dir: Path, ds: ImageDataset, D: torch.nn.Module, *, device: torch.device,
          progress: bool = True) -> TrainState:
    """Run (or continue) the training run `cfg` in `run_dir` until `cfg.steps` iterations are done."""
    run_dir = Path(run_dir)
    D = D.to(device).train()
    s = TrainState(D=D, ema=EMA(D, cfg.ema.kind, cfg.ema.sigma_rel, cfg.ema.beta),
                   opt=make_optimizer(cfg, D.parameters()),
                   sampler=BatchSampler(len(ds), cfg.batch, cfg.seed),
                   gen=torch.Generator(device=device).manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)
    ckpts = ckpt.list_checkpoints(run_dir)
    if ckpts:
        restore(ckpts[-1], s)
    with _stop_on_signal(s):
        _loop(cfg, run_dir, ds, s, device, progress)
    if s.stop_requested:
        save(run_dir, cfg, s)
    return s


@contextlib.contextmanager
def _stop_on_signal(s: TrainState):
    """SIGINT/SIGTERM ask the loop to stop after the current iteration (then it checkpoints)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        s.stop_requested = True

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _loop(cfg, run_dir, ds, s: TrainState, device, progress):
    images = ds.images.to(device)
    labels = ds.labels.to(device) if (ds.labels is not None and cfg.net.label_dim) else None
    params = [p for p in s.D.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.steps, initial=s.step, disable=not progress, unit="it", dynamic_ncols=True)
    t_last, n_last, bad_run = time.perf_counter(), s.step, 0
    log = open(run_dir / "log.jsonl", "a")
    try:
        while s.step < cfg.steps and not s.stop_requested:
            idx = s.sampler.next_batch().to(device)
            x0 = images[idx].to(torch.float32) / 127.5 - 1
            loss, info = batch_loss(cfg, s.D, x0, None if labels is None else labels[idx], s.step, s.gen)
            loss = loss.mean()
            s.opt.zero_grad(set_to_none=True)
            loss.backward()
            if not (torch.isfinite(loss) and grads_finite(params)):
                s.nonfinite_total, bad_run = s.nonfinite_total + 1, bad_run + 1
                _check_nonfinite(cfg, run_dir, s, info, bad_run)
                s.step += 1
                continue
            bad_run = 0
            for g in s.opt.param_groups:
                g["lr"] = lr_at(cfg, s.step)
            s.opt.step()
            s.step += 1
            s.ema.update(s.D, s.step)
            bar.update(1)
            if s.step % cfg.log_every == 0 or s.step == cfg.steps:
                now = time.perf_counter()
                rate = (s.step - n_last) * cfg.batch / max(now - t_last, 1e-9)
                t_last, n_last = now, s.step
                rec = {"step": s.step, "kimg": s.step * cfg.batch / 1000, "loss": loss.item(),
                       "lr": lr_at(cfg, s.step - 1), "img_per_s": round(rate, 1),
                       "nonfinite_skipped": s.nonfinite_total, **info}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4g}", img_s=f"{rate:.0f}", **info)
            if s.step % cfg.ckpt_every == 0 or s.step == cfg.steps:
                save(run_dir, cfg, s)
            if s.step % cfg.sample_every == 0 or s.step == cfg.steps:
                write_grid(run_dir, cfg, s, tuple(ds.images.shape[1:]))
    finally:
        log.close()
        bar.close()


def _check_nonfinite(cfg, run_dir, s: TrainState, info, bad_run: int) -> None:
    s.opt.zero_grad(set_to_none=True)
    if bad_run >= cfg.max_nonfinite:
        last = ckpt.list_checkpoints(run_dir)
        where = last[-1] if last else "none yet"
        raise EctuneError(f"{bad_run} non-finite losses/gradients in a row at step {s.step}"
                          f"{' (stage %d)' % info['stage'] if 'stage' in info else ''}; stopped. "
                          f"Last good checkpoint: {where}. Lower optim.lr or check the data.")
