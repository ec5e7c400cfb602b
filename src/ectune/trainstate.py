"""What a training run carries between iterations and into its checkpoints: `TrainState` (network,
EMA, optimizer, data position, generators), how a fresh one is made, and how it is saved and restored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed
from .config import RunConfig
from .data import BatchSampler
from .ema import EMA
from .errors import EctuneError
from .rng import rng_state, set_rng_state


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps)
    if o.name == "radam":
        return torch.optim.RAdam(params, lr=o.lr, betas=o.betas, eps=o.eps)
    raise EctuneError(f"unknown optimizer {o.name!r}; use optim.name=adam or radam")


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
    signalled: bool = False                 # a SIGINT/SIGTERM reached this process
    ended_early: bool = False               # the loop stopped before cfg.steps (a signal on any rank)
    model: torch.nn.Module | None = None    # what the loss calls: D, or D wrapped by DDP / torch.compile
    teacher: torch.nn.Module | None = None  # CD's frozen teacher
    scaler: torch.amp.GradScaler | None = None


def state_tensors(s: TrainState) -> dict[str, torch.Tensor]:
    out = {f"net.{k}": v for k, v in s.D.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in s.ema.module.state_dict().items()})
    return out


def _rng_states(device: torch.device):
    """This rank's dropout RNG as a checkpoint stores it (an empty CUDA state on the CPU)."""
    cpu, cuda = rng_state(device)
    return cpu, torch.empty(0, dtype=torch.uint8) if cuda is None else cuda


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
            "torch_threads": torch.get_num_threads(),       # CPU sums depend on it (a note on resuming)
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
        set_rng_state(s.gen.device, (cpu_states[rank], cuda_states[rank]))
    else:   # resumed on another number of processes: fresh, but still deterministic, dropout streams
        torch.manual_seed(int(st["step"]) * 1_000_003 + rank)
    if s.scaler is not None and st.get("scaler"):
        s.scaler.load_state_dict(st["scaler"])
    s.step, s.nonfinite_total = int(st["step"]), int(st["nonfinite_total"])
    _note_threads(ckpt_dir, st.get("torch_threads"), s.gen.device)


def _note_threads(ckpt_dir: Path, threads, device: torch.device) -> None:
    """A note (rank 0) when a CPU run resumes with another torch thread count than its checkpoint was
    written with: CPU gradients are summed in an order that depends on it (about 5e-8 apart between 1 and
    2 threads here), so the run is then not bit-identical to an uninterrupted one."""
    now = torch.get_num_threads()
    if device.type == "cpu" and isinstance(threads, int) and threads != now and distributed.is_main():
        print(f"ectune: note: {ckpt_dir} was written with {threads} torch thread{'s' * (threads != 1)} and the run "
              f"continues with {now}; on the CPU it will differ in the last bits from an uninterrupted run "
              f"(run with OMP_NUM_THREADS={threads} to continue it exactly)", file=sys.stderr)


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
