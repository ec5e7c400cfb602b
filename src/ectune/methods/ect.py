"""Easy Consistency Tuning (ECT.md §4): lognormal t, r from ECT's mapping function in stages, the
consistency loss with shared noise and shared dropout, starting from the teacher's weights."""

from dataclasses import replace

import torch

from ..losses import ect_loss
from ..schedules import ect_r, ect_stage, lognormal_sigma
from .base import Levels, Method


def stage_times(cfg, n, step, gen):
    """t ~ lognormal(P_mean, P_std) and r = r(t, stage) (ECT.md §4.2); logs the stage and the Δt/t
    quantiles (q10, q50, q90; a tensor, read only when a step is logged). Shared by ECT, SCT and CD."""
    L = cfg.loss
    t = lognormal_sigma(n, L.P_mean, L.P_std, generator=gen, device=gen.device)
    stage = ect_stage(step, cfg.stage_length)
    r = ect_r(t, stage, q=L.q, k=L.k, b=L.b, dt_floor=L.dt_floor)
    return Levels(t, r, stage_info(t, r, stage))


def stage_info(t, r, stage: int) -> dict:
    """What the ECT-style methods log: the stage and the Δt/t quantiles (q10, q50, q90)."""
    q = torch.quantile(((t - r) / t).double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, device=t.device))
    return {"stage": stage, "dt_over_t": q}


def freeze_stages(cfg):
    """The stage length as the run is created (`loss.stages` stages over its `steps`), so that a larger
    --steps later extends the last stage instead of moving the boundaries."""
    return replace(cfg, loss=replace(cfg.loss, stage_iters=cfg.stage_length))


def consistency_kw(cfg, labels) -> dict:
    """The distance and weighting settings every ECT-style loss takes."""
    L = cfg.loss
    return {"c": L.c, "weighting": L.weighting, "sigma_data": cfg.net.sigma_data, "class_labels": labels}


def _loss(cfg, D, x0, labels, d, teacher=None):
    return ect_loss(D, x0, d.t, d.r, d.noise, **consistency_kw(cfg, labels))


ECT = Method("ect", "Easy Consistency Tuning of the teacher (default)", stage_times, _loss,
             freeze=freeze_stages)
