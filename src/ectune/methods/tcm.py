"""Truncated consistency training, TCM's second stage (Lee, Xu, Chen, Kreis, Vahdat, Nie, Lipman 2025):
the tuned network covers σ ≥ t′ only, a frozen copy of the stage-1 consistency model answers below t′
(`precond.Truncated`, net.truncate_t = t′), so the training signal goes to the large noise levels that
1- and 2-step sampling start from.

Each iteration draws ln t from a heavy-tailed Student-t truncated to [ln t′, ln 80], puts a share
`loss.tcm_boundary` of the rows at t = t′ (their target is the stage-1 model's answer just below t′:
the boundary condition), and weighs the loss as mean(other rows) + tcm_w_boundary·mean(boundary rows).
r follows ECT's mapping function at stage 1's last stage, held (loss.tcm_stage), with TCM's floor on Δt/t.
Starts from the stage-1 run's EMA weights (`--teacher`, a tune run): both halves begin equal.
"""

from dataclasses import replace

import torch

from ..errors import EctuneError
from ..losses import ect_loss
from ..schedules import ect_r, ect_stage, truncated_t_sigma
from .base import Levels, Method
from .ect import consistency_kw, stage_info

T_PRIME = 1.0                               # TCM's transition time t′ (CIFAR-10 and ImageNet-64)


def _times(cfg, n, step, gen):
    L, t_prime = cfg.loss, cfg.net.truncate_t
    if t_prime <= 0:
        raise EctuneError("--method tcm needs a truncated network (net.truncate_t > 0); start it with "
                          "`ectune tune --method tcm --teacher STAGE1_TUNE_RUN`")
    t = truncated_t_sigma(n, L.P_mean, L.P_std, L.tcm_df, t_prime, cfg.sample.t_max, generator=gen)
    boundary = torch.randperm(n, generator=gen, device=gen.device)[:int(n * L.tcm_boundary)]
    t[boundary] = t_prime
    stage = L.tcm_stage
    r = ect_r(t, stage, q=L.q, k=L.k, b=L.b, dt_floor=L.dt_floor)
    nb = len(boundary)
    weight = torch.full((n,), n / (n - nb), device=t.device)
    weight[boundary] = L.tcm_w_boundary * n / nb if nb else 0.0
    return Levels(t, r, stage_info(t, r, stage), weight)


def _loss(cfg, D, x0, labels, d, teacher=None):
    return d.weight * ect_loss(D, x0, d.t, d.r, d.noise, **consistency_kw(cfg, labels))


def recipe(cfg, teacher):
    """TCM's stage-2 settings on the stage-1 run `teacher` (the official CIFAR-10 and ImageNet-64 recipes):
    t′ = 1, ln t ~ Student-t(0.01)(0, 0.2²) on [ln t′, ln 80], a quarter of the rows at the boundary with
    weight 0.1, half the stage-1 learning rate, and r at stage 1's last stage, held, with Δt/t ≥ 0.001·n(t)
    (its code's ratio limit 0.999). TCM's code counts stage 1's doublings on; its stage 1 (3M iterations)
    ends long after Δt/t reached that limit, so its stage 2 runs at stage 1's final Δt/t throughout,
    which is what holding the last stage gives after short stage-1 runs too. (Counting on after a
    200-step stage 1 took Δt/t to the floor at once and made 1-step samples worse than stage 1's.)"""
    if teacher is None or teacher.net.truncate_t > 0 or teacher.loss.method == "cmt":   # (diffusion: by its kind)
        raise EctuneError("--method tcm trains the second stage of a consistency model: pass --teacher the "
                          "stage-1 tune run (ECT, SCT, iCT or CD; not a TCM or CMT run)")
    loss = replace(cfg.loss, P_mean=0.0, P_std=0.2, tcm_df=0.01, tcm_boundary=0.25, tcm_w_boundary=0.1,
                   dt_floor=1e-3, tcm_stage=_last_stage(teacher))
    return replace(cfg, net=replace(cfg.net, truncate_t=T_PRIME), loss=loss,
                   optim=replace(cfg.optim, lr=teacher.optim.lr / 2))


def _last_stage(cfg) -> int:
    """The ECT stage of a run's last iteration."""
    return ect_stage(cfg.steps - 1, cfg.stage_length)


TCM = Method("tcm", "truncated consistency training from a stage-1 tune run (TCM's second stage)", _times,
             _loss, teacher_kind="tune", recipe=recipe)
