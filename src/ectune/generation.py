"""Sampling a checkpoint: which sampler a command runs, the seeds' labels, and the seeds sharded over
torchrun processes. `ectune sample`, `eval` and `synth` ask this module; the CLI only parses and prints.

    r = sample_checkpoint("runs/ect", 64, steps=2)      # r.images (64, C, H, W), r.seeds, r.sampler
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import distributed
from .config import RunConfig
from .errors import EctuneError
from .progress import Progress
from .sampling import Sampler, check_name, check_times, default_consistency_times, sample_images, seed_labels

# The sampler flags, and the sampler that uses each.
_FLAGS = {"num_steps": ("--num-steps", "heun"), "nfe": ("--nfe", "dpmpp2m"), "steps": ("--steps", "consistency"),
          "ts": ("--ts", "consistency"), "gamma": ("--gamma", "consistency")}
DEFAULTS = {"num_steps": 18, "nfe": 35, "steps": 1}


@dataclass
class Samples:
    """What `sample_checkpoint` made: images (N, C, H, W) in [-1, 1] on rank 0 (None on the other
    torchrun ranks), their seeds and the sampler."""
    images: torch.Tensor | None
    seeds: list[int]
    sampler: Sampler


def choose_sampler(cfg: RunConfig, ckpt=None, *, sampler: str | None = None, steps: int | None = None,
                   ts: Sequence[float] | None = None, num_steps: int | None = None, nfe: int | None = None,
                   mid_ts: Sequence[float] | None = None, gamma: float | None = None,
                   check_unused: bool = True) -> Sampler:
    """The sampler the flags ask for on the model of `cfg` (stored at `ckpt`).

    `sampler` defaults to heun for a pretrain model, consistency for a tuned one. A flag that the chosen
    sampler does not use is refused when `sampler` was given and noted on stderr when it was not
    (unless not `check_unused`). Consistency times are `ts`, else `steps` steps at `mid_ts`, else at
    `mid_times(cfg, ckpt, steps)`; their re-noising is `gamma`, else the config's sample.gamma."""
    name = check_name(sampler) if sampler else ("heun" if cfg.kind == "pretrain" else "consistency")
    if check_unused:
        _unused(name, sampler is not None, steps=steps, ts=ts, num_steps=num_steps, nfe=nfe, gamma=gamma)
    if name == "heun":
        return Sampler.heun(DEFAULTS["num_steps"] if num_steps is None else num_steps)
    if name == "dpmpp2m":
        return Sampler.dpmpp2m(DEFAULTS["nfe"] if nfe is None else nfe)
    gamma = cfg.sample.gamma if gamma is None else gamma
    if ts:
        return Sampler.consistency(_below_t_max(ts, cfg.sample.t_max), gamma)
    steps = DEFAULTS["steps"] if steps is None else steps
    mid = mid_times(cfg, ckpt, steps, gamma) if mid_ts is None else mid_ts
    return Sampler.consistency(default_consistency_times(steps, mid, cfg.sample.t_max), gamma)


def _unused(name: str, explicit: bool, **given) -> None:
    """Refuse (explicit --sampler) or note the flags given that sampler `name` does not use."""
    unused = {_FLAGS[k] for k, v in given.items() if v is not None and _FLAGS[k][1] != name}
    if not unused:
        return
    flags = " and ".join(sorted(flag for flag, _ in unused))
    owners = " or ".join(sorted({owner for _, owner in unused}))
    what = f"{flags} {'is' if len(unused) == 1 else 'are'} not used by the {name} sampler"
    if explicit:
        raise EctuneError(f"{what}; drop {flags}, or pass --sampler {owners}")
    if distributed.is_main():
        print(f"ectune: note: {what} and ignored; pass --sampler {owners} to use it", file=sys.stderr)


def _below_t_max(ts: Sequence[float], t_max: float) -> list[float]:
    ts = check_times(ts, "--ts")
    if ts[0] > t_max:
        raise EctuneError(f"--ts {ts[0]:g} is above the model's largest time t_max={t_max:g}; "
                          f"use times in (0, {t_max:g}]")
    return ts


def mid_times(cfg: RunConfig, ckpt, steps: int, gamma: float | None = None) -> list[float]:
    """Mid times for `steps`-step sampling at re-noising `gamma` (default the config's): the search
    result stored with `ckpt` for that step count and γ, else the config's sample.mid_ts."""
    from .midtime import stored_mid_times
    gamma = cfg.sample.gamma if gamma is None else gamma
    stored = stored_mid_times(ckpt, steps, gamma) if ckpt is not None else None
    return stored or list(cfg.sample.mid_ts)


def class_labels(cfg: RunConfig, seeds: Sequence[int], label: int | None = None, ckpt=None) -> torch.Tensor | None:
    """Labels (N,) of a conditional model's samples: `label` for all, else seed % classes; None for an
    unconditional model (which refuses a `label`)."""
    classes = cfg.net.label_dim
    if label is not None and not classes:
        raise EctuneError(f"--label {label}: {ckpt} is an unconditional model; drop --label")
    if label is not None and not 0 <= label < classes:
        raise EctuneError(f"--label must be in [0, {classes}) for this model ({classes} classes), got {label}")
    return torch.full((len(seeds),), label) if label is not None else seed_labels(seeds, classes)


def sample_sharded(D, seeds: Sequence[int], shape, sampler: Sampler, labels=None, *, batch: int = 256,
                   device=None, progress: bool = True) -> torch.Tensor | None:
    """Samples for `seeds`, split by seed over torchrun processes: all of them, in order, on rank 0
    (None on the others). A seed gives the same image whatever the number of processes. Rank 0 shows
    its progress: a bar, or (progress False, --no-progress) a line on stderr every ~10%."""
    mine = distributed.shard(range(len(seeds)))
    if not mine:                                # more processes than seeds
        return distributed.gather_shards(torch.empty((0, *shape)))
    with Progress(len(mine), "sampling", bar=progress, quiet=not distributed.is_main()) as bar:
        x = sample_images(D, [seeds[i] for i in mine], shape, sampler, batch=batch, device=device, progress=bar,
                          class_labels=None if labels is None else labels[mine]).cpu()
    return distributed.gather_shards(x)


def sample_checkpoint(ckpt, n: int, *, seed: int = 0, label: int | None = None, weights: str = "ema",
                      batch: int = 256, device="cpu", progress: bool = True, **flags) -> Samples:
    """`n` samples of the checkpoint `ckpt` on seeds seed, seed + 1, …; `flags` choose the sampler
    (see `choose_sampler`); `label` fixes the class of a conditional model (default: seed % classes)."""
    from .models import load_denoiser
    D, cfg = load_denoiser(ckpt, which=weights, device=device)
    seeds = list(range(seed, seed + n))
    labels = class_labels(cfg, seeds, label, ckpt)
    sampler = choose_sampler(cfg, ckpt, **flags)
    x = sample_sharded(D, seeds, cfg.net.image_shape, sampler, labels, batch=batch, device=device, progress=progress)
    return Samples(x, seeds, sampler)
