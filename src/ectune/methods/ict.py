"""Improved consistency training from scratch (iCT, Song & Dhariwal 2023; ECT.md §6): discrete Karras
pairs with a number of levels that doubles from s0 to s1 over the curriculum, random initialisation."""

import math
from dataclasses import replace

from ..losses import ect_loss
from ..schedules import ict_num_levels, ict_t_r
from .base import Levels, Method
from .ect import consistency_kw


def _times(cfg, n, step, gen):
    L = cfg.loss
    levels = ict_num_levels(step, L.ict_total_steps or cfg.steps, L.ict_s0, L.ict_s1)
    t, r = ict_t_r(n, levels, P_mean=L.P_mean, P_std=L.P_std, generator=gen, device=gen.device)
    return Levels(t, r, {"levels": levels})


def _loss(cfg, D, x0, labels, d, teacher=None):
    return ect_loss(D, x0, d.t, d.r, d.noise, **consistency_kw(cfg, labels))


def recipe(cfg, teacher=None):
    """iCT's settings on a tune preset: a discretised lognormal(−1.1, 2.0), weight 1/(σ_{i+1} − σ_i)
    ("inv_dt"), c = 0.00054·√dim. Its CIFAR-10 dropout of 0.3 is not applied: the comparison keeps the
    preset's network as it is (`--set net.dropout=0.3` to follow iCT)."""
    dim = cfg.net.in_channels * cfg.net.img_resolution ** 2
    return replace(cfg, loss=replace(cfg.loss, P_mean=-1.1, P_std=2.0, weighting="inv_dt",
                                     c=0.00054 * math.sqrt(dim)))


def freeze(cfg):
    """The curriculum length K as the run is created (its steps), so a larger --steps keeps the doubling."""
    return replace(cfg, loss=replace(cfg.loss, ict_total_steps=cfg.loss.ict_total_steps or cfg.steps))


ICT = Method("ict", "consistency training from random init (iCT schedule)", _times, _loss, start="new",
             recipe=recipe, freeze=freeze)
