"""ECT with a variance-reduced r-point (SCT, Wang, Geng & Li 2024): x_r is one PF-ODE Euler step from
x_t with the "stable target field" estimate of E[x0 | x_t] over `loss.sct_refs` training images drawn
for each iteration (the same for every row, process and micro-batch)."""

from ..losses import sct_loss
from .base import Method
from .ect import consistency_kw, freeze_stages, stage_times


def _loss(cfg, D, x0, labels, d, teacher=None):
    refs = x0[:0] if d.ref_images is None else d.ref_images
    return sct_loss(D, x0, d.t, d.r, d.noise, refs, ref_labels=d.ref_labels, **consistency_kw(cfg, labels))


SCT = Method("sct", "ECT with a variance-reduced r-point (loss.sct_refs reference images)", stage_times,
             _loss, references=lambda cfg: cfg.loss.sct_refs, freeze=freeze_stages)
