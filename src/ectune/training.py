"""The thin training loop shared by `pretrain` (EDM loss) and `tune` (ECT loss).

One iteration: draw a batch → per-sample loss → mean → backward → finite check → lr → step → EMA.
Checkpoints carry everything needed to continue: weights, EMA, optimizer, RNG and data position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import RunConfig
from .data import BatchSampler, ImageDataset
from .ema import EMA
from .errors import EctuneError
from .images import save_samples
from .losses import cd_loss, ect_loss, edm2_loss, edm_loss, sct_loss
from .monitor import Monitor, check_eval, eval_due, trim_metrics
from .sampling import default_consistency_times, sample_images
from .schedules import ect_r, ect_stage, ict_num_levels, ict_t_r, lognormal_sigma


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps)
    if o.name == "radam":
        return torch.optim.RAdam(params, lr=o.lr, betas=o.betas, eps=o.eps)
    raise EctuneError(f"unknown optimizer {o.name!r}; use optim.name=adam or radam")


def check_trainable(cfg: RunConfig, D: torch.nn.Module, n_items: int, device: torch.device) -> None:
    """Raise the EctuneError that `train` would raise for this config before it trains (precision,
    optimizer, batch over processes, loss method), so that a bad config is refused before a run
    folder is made."""
    autocast_dtype(cfg.engine.precision, device)
    make_optimizer(cfg, D.parameters())                     # (no state until its first step)
    BatchSampler(n_items, cfg.batch, cfg.seed, rank=distributed.rank(), world_size=distributed.world_size())
    if cfg.loss.method not in METHODS:
        raise EctuneError(f"unknown loss.method {cfg.loss.method!r}; use one of {', '.join(METHODS)}")
    check_eval(cfg)


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate of iteration `step` (0-based): linear warm-up, then optional inverse-sqrt decay."""
    o = cfg.optim
    lr = o.lr
    if o.warmup_steps > 0:
        lr *= min((step + 1) / o.warmup_steps, 1.0)
    if o.lr_ref_steps > 0:
        lr /= math.sqrt(max(step / o.lr_ref_steps, 1.0))
    return lr


METHODS = ("edm", "ect", "sct", "ict", "cd")


@dataclass
class Draws:
    """The random draws of one iteration for the whole global batch: noise levels t (and r for the
    consistency methods), the noise ε, and what to log (ECT stage or iCT levels). Every process draws
    the same global batch from the same generator and takes its rows, so the result does not depend
    on the number of processes or on gradient accumulation."""
    step: int
    t: torch.Tensor
    r: torch.Tensor | None
    noise: torch.Tensor
    info: dict
    refs: torch.Tensor | None = None        # SCT: dataset indices of the iteration's reference images
    ref_images: torch.Tensor | None = None  # ... and those images in [-1, 1] (with their labels), shared by all rows
    ref_labels: torch.Tensor | None = None

    def rows(self, lo: int, hi: int) -> "Draws":
        r = None if self.r is None else self.r[lo:hi]
        return dataclasses.replace(self, t=self.t[lo:hi], r=r, noise=self.noise[lo:hi])

    def with_refs(self, images: torch.Tensor, labels: torch.Tensor | None) -> "Draws":
        """The reference images (and labels) of `refs`, from the run's uint8 dataset."""
        if self.refs is None:
            return self
        return dataclasses.replace(self, ref_images=images[self.refs].to(torch.float32) / 127.5 - 1,
                                   ref_labels=None if labels is None else labels[self.refs])


def draw(cfg: RunConfig, n: int, shape, step: int, gen: torch.Generator, n_items: int = 0) -> Draws:
    """Iteration `step`'s draws for n samples of `shape`. ECT and CD share the (t, r) schedule
    (lognormal t, ECT's mapping function); iCT draws discrete Karras pairs with a doubling number of
    levels; EDM needs only σ."""
    L, dev = cfg.loss, gen.device
    if L.method not in METHODS:
        raise EctuneError(f"unknown loss.method {L.method!r}; use one of {', '.join(METHODS)}")
    r, info = None, {}
    if L.method == "ict":
        levels = ict_num_levels(step, L.ict_total_steps or cfg.steps, L.ict_s0, L.ict_s1)
        t, r = ict_t_r(n, levels, P_mean=L.P_mean, P_std=L.P_std, generator=gen, device=dev)
        info = {"levels": levels}
    else:
        t = lognormal_sigma(n, L.P_mean, L.P_std, generator=gen, device=dev)
    noise = torch.randn((n, *shape), generator=gen, device=dev)
    refs = None
    if L.method in ("ect", "sct", "cd"):
        stage = ect_stage(step, cfg.stage_iters)
        r = ect_r(t, stage, q=L.q, k=L.k, b=L.b)
        q = torch.quantile(((t - r) / t).double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, device=dev))
        info = {"stage": stage, "dt_over_t": q}             # a tensor: read (a device sync) only when logged
    if L.method == "sct" and L.sct_refs:       # the same references for every row, rank and micro-batch
        refs = torch.randint(n_items, (L.sct_refs,), generator=gen, device=dev)
    return Draws(step, t, r, noise, info, refs)


def batch_loss(cfg: RunConfig, D, x0, labels, d: Draws, teacher=None) -> torch.Tensor:
    """Per-sample loss (B,) of the method in `cfg.loss` for images x0 and their draws `d`."""
    L = cfg.loss
    kw = {"c": L.c, "weighting": L.weighting, "sigma_data": cfg.net.sigma_data, "class_labels": labels}
    if L.method == "edm":                       # EDM2 networks with a logvar head train with EDM2's loss
        loss = edm2_loss if cfg.net.logvar_channels else edm_loss
        return loss(D, x0, d.t, d.noise, sigma_data=cfg.net.sigma_data, class_labels=labels)
    if L.method in ("ect", "ict"):
        return ect_loss(D, x0, d.t, d.r, d.noise, **kw)
    if L.method == "sct":
        refs = x0[:0] if d.ref_images is None else d.ref_images
        return sct_loss(D, x0, d.t, d.r, d.noise, refs, ref_labels=d.ref_labels, **kw)
    if teacher is None:
        raise EctuneError("loss.method=cd needs a frozen teacher; pass --teacher")
    return cd_loss(D, teacher, x0, d.t, d.r, d.noise, solver=L.cd_solver, **kw)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an `engine.precision` setting on `device` (None: full fp32)."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise EctuneError(f"unknown engine.precision {precision!r}; use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise EctuneError("engine.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return table[precision]


@dataclass
class TrainState:
    """What moves between iterations and into checkpoints."""
    D: torch.nn.Module                      # the network itself (its weights are the checkpoint's)
    ema: EMA
    opt: torch.optim.Optimizer
    sampler: BatchSampler
    gen: torch.Generator
    step: int = 0
    start_step: int = 0                     # the step this command started (or resumed) at
    nonfinite_total: int = 0
    stop_requested: bool = False
    model: torch.nn.Module | None = None    # what the loss calls: D, or D wrapped by DDP / torch.compile
    teacher: torch.nn.Module | None = None  # CD's frozen teacher
    scaler: torch.amp.GradScaler | None = None


def state_tensors(s: TrainState) -> dict[str, torch.Tensor]:
    out = {f"net.{k}": v for k, v in s.D.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in s.ema.module.state_dict().items()})
    return out


def _rng_states(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    return torch.get_rng_state(), cuda


def save(run_dir: Path, cfg: RunConfig, s: TrainState) -> Path | None:
    """Checkpoint written by rank 0; every rank contributes its own CPU/CUDA RNG state."""
    rngs = distributed.all_gather_object(_rng_states(s.gen.device))

    def write() -> Path:
        train_state = {
            "step": s.step, "optimizer": s.opt.state_dict(), "sampler": s.sampler.state_dict(),
            "gen": s.gen.get_state(), "cpu_rng": rngs[0][0], "cuda_rng": rngs[0][1],
            "rank_cpu_rng": [c for c, _ in rngs], "rank_cuda_rng": [g for _, g in rngs],
            "nonfinite_total": s.nonfinite_total,
            "scaler": s.scaler.state_dict() if s.scaler is not None else {},
        }
        return ckpt.save_checkpoint(run_dir, s.step, cfg, state_tensors(s), train_state, keep=cfg.keep_ckpts)
    return distributed.on_main(write)               # a failed write stops every rank with its message


def restore(ckpt_dir: Path, s: TrainState) -> None:
    """Load a checkpoint into `s` (weights, EMA, optimizer, RNG of this rank, data position)."""
    _, tensors, _ = ckpt.read_weights(ckpt_dir / "model.safetensors")
    ckpt.load_state_checked(s.D, ckpt.split_prefix(tensors, "net"), str(ckpt_dir))
    ckpt.load_state_checked(s.ema.module, ckpt.split_prefix(tensors, "ema"), str(ckpt_dir))
    st = ckpt.read_train_state(ckpt_dir)
    s.opt.load_state_dict(st["optimizer"])
    if st["sampler"].get("n") != s.sampler.n:
        raise ckpt.RunMismatch(f"its checkpoint {ckpt_dir} was trained on {st['sampler'].get('n')} images but the "
                               f"data has {s.sampler.n}")
    s.sampler.load_state_dict(st["sampler"])
    s.gen.set_state(st["gen"])
    rank = distributed.rank()
    cpu_states, cuda_states = st.get("rank_cpu_rng", [st["cpu_rng"]]), st.get("rank_cuda_rng", [st["cuda_rng"]])
    if len(cpu_states) == distributed.world_size():
        torch.set_rng_state(cpu_states[rank])
        if cuda_states[rank].numel() and s.gen.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_states[rank], s.gen.device)
    else:   # resumed on another number of processes: fresh, but still deterministic, dropout streams
        torch.manual_seed(int(st["step"]) * 1_000_003 + rank)
    if s.scaler is not None and st.get("scaler"):
        s.scaler.load_state_dict(st["scaler"])
    s.step, s.nonfinite_total = int(st["step"]), int(st["nonfinite_total"])


def grads_finite(params) -> bool:
    norms = [p.grad.detach().abs().max() for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def write_grid(run_dir: Path, cfg: RunConfig, s: TrainState, shape) -> list[Path]:
    """Interval sample grids from the EMA weights: Heun for pretraining, 1- and 2-step for tuning.
    A grid that cannot be written (a full disk) is reported in one line and training goes on: grids
    are for looking at, the checkpoints are what a run needs."""
    try:
        return _write_grid(run_dir, cfg, s, shape)
    except OSError as e:
        print(f"ectune: warning: could not write the step-{s.step} sample grid in {run_dir / 'samples'} "
              f"({e.strerror or e}); training goes on", file=sys.stderr, flush=True)
        return []


def _write_grid(run_dir: Path, cfg: RunConfig, s: TrainState, shape) -> list[Path]:
    from .monitor import run_samplers
    from .sampling import seed_labels
    seeds = list(range(cfg.sample.grid))
    labels = seed_labels(seeds, cfg.net.label_dim)
    paths = []
    for sampler in run_samplers(cfg):
        x = sample_images(s.ema.module, seeds, shape, sampler, class_labels=labels, device=s.gen.device)
        name = f"heun{sampler.steps}" if sampler.name == "heun" else f"{sampler.steps}step"
        paths.append(save_samples(x, run_dir / "samples" / f"{name}-{s.step:08d}.png"))
    return paths


def train(cfg: RunConfig, run_dir: Path, ds: ImageDataset, D: torch.nn.Module, *, device: torch.device,
          progress: bool = True, teacher: torch.nn.Module | None = None,
          on_start: Callable[[TrainState], None] | None = None) -> TrainState:
    """Run (or continue) the training run `cfg` in `run_dir` until `cfg.steps` iterations are done.

    `on_start(state)` runs on rank 0 once the latest checkpoint is restored and before anything in
    the folder changes, and only when there are steps left to train (`start_step < cfg.steps`).

    Under torchrun every process calls this with the same arguments; the global batch `cfg.batch`
    is split across processes (and into `engine.micro_batch` chunks), gradients are averaged by DDP,
    and rank 0 alone writes logs, grids and checkpoints.
    """
    run_dir, rank = Path(run_dir), distributed.rank()
    amp_dtype = autocast_dtype(cfg.engine.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.engine.tf32
    s = new_state(cfg, D, len(ds), device, teacher=teacher)
    torch.manual_seed(cfg.seed + rank)                      # dropout streams differ between ranks
    ckpts = ckpt.checkpoint_folders(run_dir)                # damaged ones too: the latest is never skipped
    if ckpts:
        with ckpt.resuming(ckpts[-1], ckpts[-2] if len(ckpts) > 1 else None):
            restore(ckpts[-1], s)
    s.start_step = s.step
    if s.step >= cfg.steps:                                 # complete: nothing to do, nothing is changed
        return s
    if on_start is not None:
        distributed.on_main(lambda: on_start(s))
    if distributed.is_main():
        ckpt.trim_log(run_dir, s.step)                      # what was logged after that checkpoint is redone
        trim_metrics(run_dir, s.step)
    s.model = wrap_model(cfg, s.D, device)
    with _stop_on_signal(s):
        _loop(cfg, run_dir, ds, s, device, progress and distributed.is_main(), amp_dtype)
    latest = distributed.on_main(lambda: [p.name for p in ckpt.list_checkpoints(run_dir)][-1:])
    if latest != [f"{s.step:08d}"]:                         # stopped by a signal, or the last steps were skipped
        save(run_dir, cfg, s)
    return s


def new_state(cfg: RunConfig, D: torch.nn.Module, n_items: int, device: torch.device, *,
              teacher: torch.nn.Module | None = None) -> TrainState:
    """A fresh TrainState: D on `device` in train mode (channels_last if asked), its EMA, the optimizer,
    this rank's batch sampler over `n_items`, the noise generator, CD's frozen teacher, and an fp16
    loss scaler when engine.precision is fp16. `model` is D itself until `wrap_model`."""
    D = D.to(device).train()
    if cfg.engine.channels_last:
        D = D.to(memory_format=torch.channels_last)
    fp16 = autocast_dtype(cfg.engine.precision, device) == torch.float16
    return TrainState(D=D, ema=EMA(D, cfg.ema.kind, cfg.ema.sigma_rel, cfg.ema.beta),
                      opt=make_optimizer(cfg, D.parameters()),
                      sampler=BatchSampler(n_items, cfg.batch, cfg.seed, rank=distributed.rank(),
                                           world_size=distributed.world_size()),
                      gen=torch.Generator(device=device).manual_seed(cfg.seed), model=D,
                      teacher=None if teacher is None else teacher.to(device).eval().requires_grad_(False),
                      scaler=torch.amp.GradScaler(device.type, init_scale=2.0**12) if fp16 else None)


def wrap_model(cfg: RunConfig, D: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """What the loss calls: D, in DDP under torchrun, then torch.compile'd if engine.compile."""
    model = D
    if distributed.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            D, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if cfg.engine.compile:
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True              # dropout masks must replay exactly (ECT §4.5)
        model = torch.compile(model)
    return model


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


def _accumulate(cfg, s: TrainState, images, labels, idx, amp_dtype) -> tuple[torch.Tensor, dict]:
    """Forward and backward of this process's share of one global batch, in micro-batches.

    Gradients add up to those of the global batch mean; returns the sum of this share's losses and
    what to log.
    """
    world, local = distributed.world_size(), idx.shape[0]
    lo = distributed.rank() * local
    d = draw(cfg, cfg.batch, tuple(images.shape[1:]), s.step, s.gen, n_items=images.shape[0]).with_refs(images, labels)
    micro = cfg.engine.micro_batch if cfg.engine.micro_batch > 0 else local
    total = torch.zeros((), device=images.device)
    for a in range(0, local, micro):
        b = min(a + micro, local)
        x0 = images[idx[a:b]].to(torch.float32) / 127.5 - 1
        if cfg.engine.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        last = b == local
        sync = contextlib.nullcontext() if (last or world == 1) else s.model.no_sync()
        with sync:
            with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = batch_loss(cfg, s.model, x0, None if labels is None else labels[idx[a:b]],
                                  d.rows(lo + a, lo + b), s.teacher)
            scaled = loss.sum() * (world / cfg.batch)           # DDP averages over ranks
            (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
        total += loss.detach().sum()
    return total, d.info


def _loop(cfg, run_dir, ds, s: TrainState, device, progress, amp_dtype):
    images = ds.images.to(device)
    labels = ds.labels.to(device) if (ds.labels is not None and cfg.net.label_dim) else None
    params = [p for p in s.D.parameters() if p.requires_grad]
    main = distributed.is_main()
    bar = tqdm(total=cfg.steps, initial=s.step, disable=not progress, unit="it", dynamic_ncols=True)
    rate = _Rate(s.step, cfg.batch)
    bad_run, stop = 0, False
    log = open(run_dir / "log.jsonl", "a") if main else None     # noqa: SIM115 (closed in finally)
    monitor, started = (Monitor(cfg, run_dir, device, progress=progress) if main else None), time.time()
    try:
        while s.step < cfg.steps and not stop:        # `stop` is agreed by all ranks, s.stop_requested is local
            loss, info, stop = iteration(cfg, s, images, labels, amp_dtype)
            finite = bool(torch.isfinite(loss)) and grads_finite(params)
            bad_run = 0 if finite else bad_run + 1
            if finite:
                update(cfg, s)
            else:                                          # skipped: counted, and stopped after a run of them
                s.nonfinite_total += 1
                if s.scaler is not None:
                    s.scaler.update()                      # lowers the fp16 loss scale
                _check_nonfinite(cfg, run_dir, s, info, bad_run)
                s.step += 1
            bar.update(1)
            if main and finite and (s.step % cfg.log_every == 0 or s.step == cfg.steps):
                rec = {"step": s.step, "kimg": s.step * cfg.batch / 1000, "loss": loss.item(),
                       "lr": lr_at(cfg, s.step - 1), "img_per_s": rate.since_last(s.step),
                       "nonfinite_skipped": s.nonfinite_total, **_loggable(info)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                monitor.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4g}", img_s=f"{rec['img_per_s']:.0f}",
                                **{k: v for k, v in info.items() if not isinstance(v, torch.Tensor)})
            if finite and eval_due(cfg, s.step):          # before its checkpoint: a resume redoes it or has it
                distributed.on_main(lambda: monitor.evaluate(s, started))
            if finite and (s.step % cfg.ckpt_every == 0 or s.step == cfg.steps):   # checkpoints stay "good"
                save(run_dir, cfg, s)
            if finite and (s.step % cfg.sample_every == 0 or s.step == cfg.steps):
                paths = distributed.on_main(lambda: write_grid(run_dir, cfg, s, tuple(ds.images.shape[1:])))
                for path in (paths or []) if monitor is not None else []:
                    monitor.grid(path, s.step)
    finally:
        s.stop_requested = stop and s.step < cfg.steps   # a stop during the last step: the run is complete
        if log is not None:
            log.close()
        if monitor is not None:
            monitor.close()
        bar.close()


def _loggable(info: dict) -> dict:
    """`info` as JSON numbers: the Δt/t quantiles (q10, q50, q90) read from their tensor."""
    out = dict(info)
    if isinstance(out.get("dt_over_t"), torch.Tensor):
        out["dt_over_t"] = dict(zip(("q10", "q50", "q90"), out["dt_over_t"].tolist()))
    return out


def iteration(cfg, s: TrainState, images, labels, amp_dtype) -> tuple[torch.Tensor, dict, bool]:
    """Forward and backward of the next global batch (gradients unscaled under fp16), then one
    all-reduce that gives every rank the global mean loss and any rank's stop request.
    Returns (loss, what to log, stop agreed); taking the step is `update`'s job."""
    idx = s.sampler.next_batch().to(images.device)
    s.opt.zero_grad(set_to_none=True)
    loss_sum, info = _accumulate(cfg, s, images, labels, idx, amp_dtype)
    if s.scaler is not None:
        s.scaler.unscale_(s.opt)
    stats = distributed.all_reduce_sum(torch.stack([loss_sum.float(), torch.tensor(
        float(s.stop_requested), device=images.device)]))
    return stats[0] / cfg.batch, info, bool(stats[1] > 0)


def update(cfg, s: TrainState) -> None:
    """Optimizer step at this iteration's learning rate, then the EMA; advances s.step."""
    for g in s.opt.param_groups:
        g["lr"] = lr_at(cfg, s.step)
    if s.scaler is not None:
        s.scaler.step(s.opt)
        s.scaler.update()
    else:
        s.opt.step()
    s.step += 1
    s.ema.update(s.D, s.step)


class _Rate:
    """Images per second between successive log records."""

    def __init__(self, step: int, batch: int):
        self.step, self.batch, self.t = step, batch, time.perf_counter()

    def since_last(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * self.batch / max(now - self.t, 1e-9)
        self.step, self.t = step, now
        return round(rate, 1)


def _check_nonfinite(cfg, run_dir, s: TrainState, info, bad_run: int) -> None:
    s.opt.zero_grad(set_to_none=True)
    if bad_run >= cfg.max_nonfinite:
        last = ckpt.list_checkpoints(run_dir)
        where = last[-1] if last else "none yet"
        raise EctuneError(f"{bad_run} non-finite losses/gradients in a row at step {s.step + 1}"   # as in the log
                          f"{' (stage %d)' % info['stage'] if 'stage' in info else ''}; stopped. "
                          f"Last good checkpoint: {where}. Lower optim.lr or check the data.")
