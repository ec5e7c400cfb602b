"""Consistency mid-training (CMT, Hu, Lai, Mitsufuji & Ermon 2025): between diffusion pretraining and
consistency tuning, the student learns to map points of the frozen teacher's own ODE trajectories
straight to their ends — a fixed regression target instead of ECT's moving one — and ECT or SCT then
continues from it (`ectune tune --method sct --teacher CMT_RUN`).

Each iteration draws B / M trajectories: DPM-Solver++(2M) on the Karras grid of `loss.cmt_steps`
levels from 80·ε, ε the first noise of each group of M = cmt_steps − 1 rows. Row i of a group is the
trajectory's state at level i (every level but σ_min, where the model is the identity), its target
the trajectory's end; all points weigh the same (CMT's discrete oracle loss). The trajectories cost
cmt_steps teacher calls per M rows: about one per row, like ECT's target. The data's images are not
used (the batch still counts them: its rows are the budget).
"""

import torch

from ..errors import EctuneError
from ..losses import cmt_loss
from ..schedules import karras_sigmas
from .base import Levels, Method


def grid(cfg):
    """The trajectories' levels: the Karras grid of loss.cmt_steps positive levels up to the run's t_max, then 0."""
    return karras_sigmas(cfg.loss.cmt_steps, sigma_max=cfg.sample.t_max)


def points(cfg) -> int:
    """Rows per trajectory: every positive level but the last."""
    return cfg.loss.cmt_steps - 1


def _times(cfg, n, step, gen):
    m = points(cfg)
    t = grid(cfg)[:m].to(device=gen.device, dtype=torch.float32).repeat(n // m)
    return Levels(t, None, {"trajectories": n // m})


def _loss(cfg, D, x0, labels, d, teacher=None):
    if teacher is None:
        raise EctuneError("loss.method=cmt needs a frozen diffusion teacher; pass --teacher")
    return cmt_loss(D, teacher, d.t, d.noise, grid(cfg).to(d.t.device), c=cfg.loss.c, class_labels=labels)


def _check(cfg, world: int) -> None:
    m, local = points(cfg), cfg.batch // max(world, 1)
    micro = cfg.engine.micro_batch if cfg.engine.micro_batch > 0 else local
    if local % m or micro % m:
        raise EctuneError(f"--method cmt takes whole trajectories of loss.cmt_steps − 1 = {m} points: the batch per "
                          f"process ({local}) and micro-batch ({micro}) must be multiples of {m}; change --batch or "
                          "loss.cmt_steps")


CMT = Method("cmt", "consistency mid-training on the frozen teacher's ODE trajectories (then ECT/SCT from it)",
             _times, _loss, frozen_teacher=True, check=_check)
