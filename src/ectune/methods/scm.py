"""Continuous-time consistency training (sCT of sCM, Lu & Song 2024) from the teacher's weights: the
limit Δt → 0 of ECT's pairs, with the tangent df/dt of one JVP in TrigFlow time instead of a second
point. EDM's preconditioning is TrigFlow's (losses.trigflow_consistency), so the EDM teacher needs no
retraining; its time embedding ln(σd·tan s)/4 is the one sCM found less stable than its own."""

from dataclasses import replace

from ..losses import scm_loss
from ..schedules import lognormal_sigma
from .base import Levels, Method


def warmup_ratio(cfg, step: int) -> float:
    """Tangent warm-up: the share of the tangent's dF/dt term at iteration `step`, 0 → 1 linearly."""
    return min(1.0, step / cfg.loss.scm_warmup) if cfg.loss.scm_warmup > 0 else 1.0


def _times(cfg, n, step, gen):
    L = cfg.loss
    sigma = lognormal_sigma(n, L.P_mean, L.P_std, generator=gen, device=gen.device)   # σ = σd·tan s
    return Levels(sigma, None, {"tangent_warmup": warmup_ratio(cfg, step)})


def _loss(cfg, D, x0, labels, d, teacher=None):
    return scm_loss(D, x0, d.t, d.noise, warmup=warmup_ratio(cfg, d.step), c=cfg.loss.scm_c,
                    sigma_data=cfg.net.sigma_data, class_labels=labels)


def recipe(cfg, teacher=None):
    """sCM's time distribution for sCT on CIFAR-10, ln σ ~ N(−1.0, 1.4²) (its App. G.2; `--set loss.P_mean=…`
    overrides). The network, optimizer and EMA stay the preset's, as for every method compared here."""
    return replace(cfg, loss=replace(cfg.loss, P_mean=-1.0, P_std=1.4))


def _freeze(cfg):
    """The warm-up length as the run is created (a tenth of its steps unless set), so that a larger
    --steps later does not stretch it."""
    return cfg if cfg.loss.scm_warmup else replace(cfg, loss=replace(cfg.loss, scm_warmup=max(1, cfg.steps // 10)))


SCM = Method("scm", "continuous-time consistency training (sCT, one JVP per iteration)", _times, _loss,
             recipe=recipe, freeze=_freeze)
