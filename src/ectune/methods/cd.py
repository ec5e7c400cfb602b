"""Consistency distillation (Song et al. 2023) on ECT's (t, r) schedule: x_r is one ODE step of the
frozen teacher from x_t; the student starts from the teacher's weights."""

from ..errors import EctuneError
from ..losses import cd_loss
from .base import Method
from .ect import consistency_kw, freeze_stages, stage_times


def _loss(cfg, D, x0, labels, d, teacher=None):
    if teacher is None:
        raise EctuneError("loss.method=cd needs a frozen teacher; pass --teacher")
    return cd_loss(D, teacher, x0, d.t, d.r, d.noise, solver=cfg.loss.cd_solver, **consistency_kw(cfg, labels))


CD = Method("cd", "consistency distillation from the frozen teacher", stage_times, _loss,
            frozen_teacher=True, freeze=freeze_stages)
