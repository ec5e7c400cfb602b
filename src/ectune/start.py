"""What a training run starts from: its data, its network and, for the consistency methods, its teacher.

`pretrain_parts` and `tune_parts` take a finished config (preset, flags and --set applied) and return
what `runs.train_run` trains; `tune_base` is the config a tune run is built on, read from its teacher
(the teacher's network, data and preset, with the method's own recipe). Every refusal is an
EctuneError raised before a run folder is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import RunConfig, apply_overrides
from .errors import EctuneError
from .methods import TUNE_METHODS, method
from .presets import preset


def configure(base: RunConfig, *, overrides=(), steps: int | None = None, kimg: float | None = None,
              **fields) -> RunConfig:
    """`base` (a preset, or a tune base) with top-level `fields` set (those given as None are left),
    then the KEY=VALUE `overrides` (`--set`), then the budget: `steps` iterations, or `kimg` thousands
    of images at the final batch size."""
    cfg = replace(base, **{k: v for k, v in fields.items() if v is not None})
    cfg = apply_overrides(cfg, list(overrides))
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    elif kimg is not None:
        cfg = replace(cfg, steps=max(1, math.ceil(kimg * 1000 / cfg.batch)))
    if cfg.steps < 1 or cfg.batch < 1:
        raise EctuneError("--steps/--kimg and --batch must be positive")
    return cfg


def fit_preset_eval(cfg: RunConfig, overrides=()) -> tuple[RunConfig, list[str]]:
    """A preset's default in-loop evaluation that does not fit the data (the classifier metric on data
    that is not Fashion-MNIST) is turned off, with a note to print once the run starts; one asked for
    in `overrides` (--set eval.*) is left for the training layer to check (and refuse)."""
    from .monitor import eval_fits
    if cfg.eval.every_kimg <= 0 or eval_fits(cfg) or any(o.strip().startswith("eval.") for o in overrides):
        return cfg, []
    note = (f"in-loop evaluation off: its {cfg.eval.metric} metric does not fit --data {cfg.data}; "
            "--set eval.metric=inception to score this data during training")
    return replace(cfg, eval=replace(cfg.eval, every_kimg=0.0)), [note]


def load_training_data(spec: str):
    """The dataset `spec`, refused unless its images are square (the networks' grid)."""
    from .data import load_dataset
    ds = load_dataset(spec)
    h, w = ds.images.shape[2:]
    if h != w:
        raise EctuneError(f"images must be square for the UNet, got {h}x{w}; crop or resize the dataset")
    return ds


def pretrain_parts(cfg: RunConfig, cond: bool = False):
    """(config with the data's shape and classes, dataset, new network) of a pretrain run; `cond`:
    class-conditional on the dataset's labels."""
    from .models import build_denoiser
    if cfg.kind != "pretrain":
        raise EctuneError(f"pretrain trains an EDM diffusion model, so --set loss.method={cfg.loss.method} is "
                          "refused; use `ectune tune` to train a consistency model")
    ds = load_training_data(cfg.data)
    if cond and ds.labels is None:
        raise EctuneError(f"--cond needs class labels but --data {cfg.data} has none; drop --cond or use labelled data")
    if cond:
        _check_label_values(ds, cfg.data)
    label_dim = ds.num_classes if cond else cfg.net.label_dim
    if label_dim and ds.labels is None:
        raise EctuneError(f"--cond needs class labels but {cfg.data} has none")
    net = replace(cfg.net, img_resolution=ds.images.shape[2], in_channels=ds.images.shape[1], label_dim=label_dim)
    cfg = replace(cfg, net=net)
    return cfg, ds, build_denoiser(cfg.net, cfg.seed)          # the network is built before the folder


def _check_label_values(ds, spec: str) -> None:
    """A conditional network has one label embedding per value up to the largest: refuse labels that
    are far sparser than 0..C-1 (a class subset such as [classes=8,9] is fine)."""
    distinct = int(ds.labels.unique().numel())
    if ds.num_classes > 4 * distinct + 16:
        raise EctuneError(f"--cond: --data {spec} has labels up to {ds.num_classes - 1} but only {distinct} distinct "
                          f"values, so the network would need {ds.num_classes} label embeddings; renumber the "
                          "labels 0..C-1")


@dataclass
class TuneBase:
    """The config a tune run is built on, and its teacher: weights (`tensors`) or a diffusers model,
    and the teacher's own config."""
    cfg: RunConfig
    tensors: dict | None = None
    diffusers: torch.nn.Module | None = None
    teacher_cfg: RunConfig | None = None


def tune_base(method_name: str | None, teacher: str | None, preset_name: str | None, data: str | None,
              out: Path) -> TuneBase:
    """The tune preset (default: the teacher's) with the teacher's network and data and the method's
    recipe; the method is `method_name`, or the preset's own (e.g. `fmnist-short`'s SCT; ECT for the
    others). iCT needs no teacher (then the preset's network on --data's shape); a diffusers DDPM folder
    is a teacher for CD only; a consistency model is no teacher (unless `out` continues a run)."""
    if teacher is None:
        base = _base_from_scratch(preset_name, data)
        method_name = method_name or base.cfg.loss.method
        if method(method_name).start == "teacher":
            raise EctuneError(f"--method {method_name} starts from a teacher: pass --teacher RUN_OR_WEIGHTS")
    else:
        base, method_name = _base_of_teacher(method_name, teacher, preset_name, out)
    cfg = replace(base.cfg, loss=replace(base.cfg.loss, method=method_name))
    return replace(base, cfg=method(method_name).recipe(cfg, base.teacher_cfg))


def _base_of_teacher(method_name: str | None, teacher: str, preset_name: str | None,
                     out: Path) -> tuple[TuneBase, str]:
    from .checkpoint import read_weights
    from .importers.diffusers_vp import diffusers_root
    from .models import diffusers_denoiser, student_net
    if diffusers_root(teacher) is not None:
        base = preset(preset_name or "fmnist", "tune")
        method_name = method_name or base.loss.method
        if not method(method_name).frozen_teacher:
            raise EctuneError(f"--teacher {teacher} is a diffusers DDPM, whose network ectune cannot tune; "
                              "distill it with --method cd (the student is the preset's network)")
        model, t_cfg = diffusers_denoiser(diffusers_root(teacher))
        net = replace(base.net, in_channels=t_cfg.net.in_channels, img_resolution=t_cfg.net.img_resolution)
        return TuneBase(replace(base, net=net, teacher=str(teacher)), diffusers=model, teacher_cfg=t_cfg), method_name
    t_cfg, tensors, _ = read_weights(teacher)
    base = preset(preset_name or t_cfg.preset, "tune")
    method_name = method_name or base.loss.method
    # (a run already in `out` is continued as it was created; for CD, runs refuses another teacher)
    m = method(method_name)
    if m.start == "teacher" and t_cfg.kind != m.teacher_kind and not (Path(out) / "config.json").is_file() \
            and not _continues_mid_training(m, t_cfg):
        raise EctuneError(_WRONG_TEACHER[m.teacher_kind].format(teacher=teacher, method=method_name))
    return TuneBase(replace(base, data=t_cfg.data, teacher=str(teacher), net=student_net(t_cfg.net, base.net)),
                    tensors=tensors, teacher_cfg=t_cfg), method_name


def _continues_mid_training(m, t_cfg: RunConfig) -> bool:
    """A CMT run is where ECT-style tuning starts (its weights, not a frozen solver): ECT, SCT."""
    return t_cfg.loss.method == "cmt" and m.teacher_kind == "pretrain" and not m.frozen_teacher


# What a teacher of the other kind is told, by the kind of teacher the method starts from.
_WRONG_TEACHER = {
    "pretrain": "--teacher {teacher} is already a consistency model; --method {method} needs a diffusion "
                "teacher: pass the pretrain run (or weights) it was tuned from",
    "tune": "--teacher {teacher} is a diffusion model; --method {method} trains the second stage of a "
            "consistency model: pass --teacher the stage-1 tune run (ECT, SCT, iCT or CD)",
}


def _base_from_scratch(preset_name: str | None, data: str | None) -> TuneBase:
    base = preset(preset_name or "fmnist", "tune")   # the preset's network on the data's shape
    if data:
        shape = load_training_data(data).images.shape
        base = replace(base, net=replace(base.net, in_channels=shape[1], img_resolution=shape[2]))
    return TuneBase(base)


def tune_parts(cfg: RunConfig, base: TuneBase):
    """(dataset, network, frozen teacher or None) of the tune run `cfg` built on `base`, after checking
    that the data fits the teacher's shape and classes."""
    from .models import build_denoiser, student_from
    if cfg.loss.method not in TUNE_METHODS:
        raise EctuneError(f"tune trains a consistency model: loss.method must be {', '.join(TUNE_METHODS[:-1])} or "
                          f"{TUNE_METHODS[-1]}, not {cfg.loss.method!r}")
    ds = load_training_data(cfg.data)
    want = (cfg.net.in_channels, cfg.net.img_resolution)
    if (ds.images.shape[1], ds.images.shape[2]) != want:
        raise EctuneError(f"data {cfg.data} is {ds.images.shape[1]}x{ds.images.shape[2]}px (channels x size) but "
                          f"the teacher expects {want[0]}x{want[1]}px; tune on data of the teacher's shape")
    if cfg.net.label_dim and (ds.labels is None or ds.num_classes > cfg.net.label_dim):
        raise EctuneError(f"the teacher is class-conditional ({cfg.net.label_dim} classes) but {cfg.data} has "
                          "no labels in that range; tune on labelled data")
    m, where = method(cfg.loss.method), f"teacher {cfg.teacher}"
    fresh = m.start == "new" or base.tensors is None    # from scratch: iCT, or CD from a diffusers teacher
    D = build_denoiser(cfg.net, cfg.seed) if fresh else student_from(base.tensors, cfg.net, where)
    teacher = None
    if m.frozen_teacher:
        teacher = base.diffusers if base.diffusers is not None else student_from(base.tensors, cfg.net, where)
    return ds, D, teacher
