"""What a training method is to the loop: how it draws an iteration's noise levels, and its loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..config import RunConfig, kind_of
from ..images import from_uint8


@dataclass
class Draws:
    """The random draws of one iteration for the whole global batch: noise levels t (and r for the
    consistency methods), the noise ε, and what to log (ECT stage or iCT levels). Every process draws
    the same global batch from the same generator and takes its rows, so the result does not depend
    on the number of processes or on gradient accumulation."""
    step: int
    t: torch.Tensor
    r: torch.Tensor | None
    noise: torch.Tensor
    info: dict
    weight: torch.Tensor | None = None      # TCM: a weight per row of the loss (its boundary rows)
    refs: torch.Tensor | None = None        # SCT: dataset indices of the iteration's reference images
    ref_images: torch.Tensor | None = None  # ... and those images in [-1, 1] (with their labels), shared by all rows
    ref_labels: torch.Tensor | None = None

    def rows(self, lo: int, hi: int) -> "Draws":
        r = None if self.r is None else self.r[lo:hi]
        w = None if self.weight is None else self.weight[lo:hi]
        return dataclasses.replace(self, t=self.t[lo:hi], r=r, noise=self.noise[lo:hi], weight=w)

    def with_refs(self, images: torch.Tensor, labels: torch.Tensor | None) -> "Draws":
        """The reference images (and labels) of `refs`, from the run's uint8 dataset."""
        if self.refs is None:
            return self
        return dataclasses.replace(self, ref_images=from_uint8(images[self.refs]),
                                   ref_labels=None if labels is None else labels[self.refs])


class Levels(NamedTuple):
    """An iteration's noise levels for the global batch: t, r (None for EDM), what to log, and a weight
    per row of the loss when the method has one (TCM)."""
    t: torch.Tensor
    r: torch.Tensor | None
    info: dict
    weight: torch.Tensor | None = None


# times(cfg, n, step, generator) -> Levels
Times = Callable[[RunConfig, int, int, torch.Generator], Levels]
# loss(cfg, D, x0, labels, draws, teacher) -> per-sample loss (B,)
Loss = Callable[..., torch.Tensor]


def _unchanged(cfg: RunConfig) -> RunConfig:
    return cfg


def _no_check(cfg: RunConfig, world: int) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """One training method: an entry of `ectune.methods.METHODS`.

    `times` draws the iteration's noise levels from the run generator (before its noise ε);
    `references` > 0 draws that many training-image indices after ε (SCT's estimate); `loss` is the
    per-sample objective. `start` says where the network starts: "new" (EDM pretraining, iCT),
    "teacher" (the teacher's weights), from a teacher of `teacher_kind` ("pretrain": a diffusion model,
    "tune": TCM's stage-1 consistency model); `frozen_teacher` keeps the teacher as CD's ODE solver.
    `recipe(cfg, teacher_cfg)` turns a tune preset (on the teacher's network; teacher_cfg None without
    a teacher) into this method's own settings (iCT's schedule and weighting, TCM's stage 2);
    `freeze` fixes, when a run is created, the schedule lengths that would otherwise follow --steps;
    `check(cfg, world)` raises EctuneError for a config the method cannot train on `world` processes
    (before a run folder is made)."""
    name: str
    help: str
    times: Times
    loss: Loss
    start: str = "teacher"
    teacher_kind: str = "pretrain"
    frozen_teacher: bool = False
    references: Callable[[RunConfig], int] = lambda cfg: 0
    recipe: Callable[[RunConfig, RunConfig | None], RunConfig] = lambda cfg, teacher: cfg
    freeze: Callable[[RunConfig], RunConfig] = _unchanged
    check: Callable[[RunConfig, int], None] = _no_check

    @property
    def kind(self) -> str:
        """"pretrain" (a diffusion model) or "tune" (a consistency model): `config.kind_of`."""
        return kind_of(self.name)
