"""The thin training loop shared by `pretrain` (EDM loss) and `tune` (ECT loss).

One iteration: draw a batch → per-sample loss → mean → backward → finite check → lr → step → EMA.
Checkpoints carry everything needed to continue: weights, EMA, optimizer, RNG and data position.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import RunConfig
from .data import BatchSampler, ImageDataset
from .errors import EctuneError
from .images import from_uint8, save_samples
from .methods import Draws, method
from .trainstate import TrainState, autocast_dtype, make_optimizer, new_state, restore, save
from .monitor import Monitor, check_eval, eval_due, trim_metrics
from .sampling import sample_images


def check_trainable(cfg: RunConfig, D: torch.nn.Module, n_items: int, device: torch.device) -> None:
    """Raise the EctuneError that `train` would raise for this config before it trains (precision,
    optimizer, batch over processes, loss method), so that a bad config is refused before a run
    folder is made."""
    autocast_dtype(cfg.engine.precision, device)
    make_optimizer(cfg, D.parameters())                     # (no state until its first step)
    BatchSampler(n_items, cfg.batch, cfg.seed, rank=distributed.rank(), world_size=distributed.world_size())
    method(cfg.loss.method).check(cfg, distributed.world_size())
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


def draw(cfg: RunConfig, n: int, shape, step: int, gen: torch.Generator, n_items: int = 0) -> Draws:
    """Iteration `step`'s draws for n samples of `shape`, in a fixed order from the run generator:
    the method's noise levels (t, r), the noise ε, then any reference-image indices (SCT)."""
    m = method(cfg.loss.method)
    levels = m.times(cfg, n, step, gen)
    noise = torch.randn((n, *shape), generator=gen, device=gen.device)
    k = m.references(cfg)                   # the same references for every row, rank and micro-batch
    refs = torch.randint(n_items, (k,), generator=gen, device=gen.device) if k else None
    return Draws(step, levels.t, levels.r, noise, levels.info, levels.weight, refs)


def batch_loss(cfg: RunConfig, D, x0, labels, d: Draws, teacher=None) -> torch.Tensor:
    """Per-sample loss (B,) of the method in `cfg.loss` for images x0 and their draws `d`."""
    return method(cfg.loss.method).loss(cfg, D, x0, labels, d, teacher)


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
    with engine_scope(cfg, device):
        return _train(cfg, Path(run_dir), ds, D, device, progress and distributed.is_main(), teacher, on_start)


def _train(cfg, run_dir, ds, D, device, progress, teacher, on_start) -> TrainState:
    s = new_state(cfg, D, len(ds), device, teacher=teacher)
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
        _loop(cfg, run_dir, ds, s, device, progress, autocast_dtype(cfg.engine.precision, device))
    latest = distributed.on_main(lambda: [p.name for p in ckpt.list_checkpoints(run_dir)][-1:])
    if latest != [f"{s.step:08d}"]:                         # stopped by a signal, or the last steps were skipped
        save(run_dir, cfg, s)
    return s


def wrap_model(cfg: RunConfig, D: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """What the loss calls: D, in DDP under torchrun, then torch.compile'd if engine.compile."""
    model = D
    if distributed.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            D, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if cfg.engine.compile:                                  # (inside engine_scope: masks replay exactly)
        model = torch.compile(model)
    return model


@contextlib.contextmanager
def engine_scope(cfg: RunConfig, device: torch.device):
    """The process-wide settings a run needs, for the run only: TF32 on CUDA (engine.tf32), inductor's
    eager random ops under engine.compile (the target pass must replay the online pass's dropout masks,
    ECT §4.5), and the global RNG that dropout draws from, seeded per rank (streams differ between
    ranks); each is put back when the run returns."""
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            stack.callback(_set_tf32, *old)
            _set_tf32(cfg.engine.tf32, cfg.engine.tf32)
        if cfg.engine.compile:
            import torch._inductor.config as inductor_config
            stack.enter_context(inductor_config.patch(fallback_random=True))
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        torch.manual_seed(cfg.seed + distributed.rank())
        yield


@contextlib.contextmanager
def stepping(cfg: RunConfig, D: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None, *,
             device: torch.device, teacher: torch.nn.Module | None = None):
    """Full training iterations outside a run folder, one per call of the function this yields: draw,
    forward and target, backward, then the optimizer step and the EMA, as in a run (in its engine
    settings), on uint8 `images` already on `device`, with the frozen `teacher` of CD and CMT. The
    function returns the iteration's mean loss. For timing and checks (benchmarks/gpu_check.py, ectune.bench)."""
    with engine_scope(cfg, device):
        s = new_state(cfg, D, len(images), device, teacher=teacher)
        s.model = wrap_model(cfg, s.D, device)
        amp = autocast_dtype(cfg.engine.precision, device)

        def step() -> torch.Tensor:
            loss, _, _ = iteration(cfg, s, images, labels, amp)
            update(cfg, s)
            return loss
        yield step


def _set_tf32(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextlib.contextmanager
def _stop_on_signal(s: TrainState):
    """SIGINT/SIGTERM ask the loop to stop after the current iteration (then it checkpoints)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        s.signalled = True

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
        x0 = from_uint8(images[idx[a:b]])
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
    rate, bad_run, stop = _Rate(s.step, cfg.batch), 0, False
    log = open(run_dir / "log.jsonl", "a") if main else None     # noqa: SIM115 (closed in finally)
    monitor, started = (Monitor(cfg, run_dir, device, progress=progress) if main else None), time.time()
    try:
        while s.step < cfg.steps and not stop:        # `stop` is agreed by all ranks, s.signalled is local
            loss, info, stop = iteration(cfg, s, images, labels, amp_dtype)
            finite = bool(torch.isfinite(loss)) and grads_finite(params)
            bad_run = 0 if finite else bad_run + 1
            update(cfg, s, finite)
            bar.update(1)
            if not finite:                                 # skipped: counted, and stopped after a run of them
                _check_nonfinite(cfg, run_dir, s, info, bad_run)
                continue
            if main and (s.step % cfg.log_every == 0 or s.step == cfg.steps):
                _log(cfg, s, loss, info, rate, log, monitor, bar)
            _at_cadence(cfg, run_dir, s, tuple(ds.images.shape[1:]), monitor, started)
    finally:
        s.ended_early = stop and s.step < cfg.steps      # a stop during the last step: the run is complete
        for closing in (log, monitor):
            if closing is not None:
                closing.close()
        bar.close()


def _log(cfg, s: TrainState, loss, info, rate, log, monitor, bar) -> None:
    """One record of log.jsonl (and TensorBoard, and the bar's postfix) after a finite step."""
    rec = {"step": s.step, "kimg": s.step * cfg.batch / 1000, "loss": loss.item(),
           "lr": lr_at(cfg, s.step - 1), "img_per_s": rate.since_last(s.step),
           "nonfinite_skipped": s.nonfinite_total, **_loggable(info)}
    log.write(json.dumps(rec) + "\n")
    log.flush()
    monitor.log(rec)
    bar.set_postfix(loss=f"{rec['loss']:.4g}", img_s=f"{rec['img_per_s']:.0f}",
                    **{k: v for k, v in info.items() if not isinstance(v, torch.Tensor)})


def _at_cadence(cfg, run_dir, s: TrainState, shape, monitor, started: float) -> None:
    """What a finite step s.step is due: the in-loop evaluation and the sample grid, then the checkpoint
    (so checkpoints stay "good"). Both come before the step's checkpoint: a kill in between resumes from
    the previous checkpoint and redoes them, so a kill never loses a grid or an evaluation."""
    last = s.step == cfg.steps
    if eval_due(cfg, s.step):
        distributed.on_main(lambda: monitor.evaluate(s, started))
    if s.step % cfg.sample_every == 0 or last:
        paths = distributed.on_main(lambda: write_grid(run_dir, cfg, s, shape))
        for path in (paths or []) if monitor is not None else []:
            monitor.grid(path, s.step)
    if s.step % cfg.ckpt_every == 0 or last:
        save(run_dir, cfg, s)


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
        float(s.signalled), device=images.device)]))
    return stats[0] / cfg.batch, info, bool(stats[1] > 0)


def update(cfg, s: TrainState, finite: bool = True) -> None:
    """End iteration s.step: the optimizer step at its learning rate and the EMA when its loss and
    gradients are finite; else skip it (its gradients dropped, counted, fp16's loss scale lowered).
    Either way s.step advances, here only."""
    if finite:
        for g in s.opt.param_groups:
            g["lr"] = lr_at(cfg, s.step)
        if s.scaler is not None:
            s.scaler.step(s.opt)
        else:
            s.opt.step()
    else:
        s.opt.zero_grad(set_to_none=True)
        s.nonfinite_total += 1
    if s.scaler is not None:
        s.scaler.update()
    s.step += 1
    if finite:
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
    """Stop the run (EctuneError) after `max_nonfinite` skipped iterations in a row."""
    if bad_run >= cfg.max_nonfinite:
        last = ckpt.list_checkpoints(run_dir)
        where = last[-1] if last else "none yet"
        raise EctuneError(f"{bad_run} non-finite losses/gradients in a row at step {s.step}"       # as in the log
                          f"{' (stage %d)' % info['stage'] if 'stage' in info else ''}; stopped. "
                          f"Last good checkpoint: {where}. Lower optim.lr or check the data.")
