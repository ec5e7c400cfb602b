"""EDM pretraining (Karras et al. 2022): σ from a lognormal, the denoising loss; EDM2 networks with a
logvar head train with EDM2's uncertainty-weighted loss (Karras et al. 2024)."""

from ..losses import edm2_loss, edm_loss
from ..schedules import lognormal_sigma
from .base import Levels, Method


def _times(cfg, n, step, gen):
    return Levels(lognormal_sigma(n, cfg.loss.P_mean, cfg.loss.P_std, generator=gen, device=gen.device), None, {})


def _loss(cfg, D, x0, labels, d, teacher=None):
    loss = edm2_loss if cfg.net.logvar_channels else edm_loss
    return loss(D, x0, d.t, d.noise, sigma_data=cfg.net.sigma_data, class_labels=labels)


EDM = Method("edm", "EDM diffusion pretraining", _times, _loss, start="new")
