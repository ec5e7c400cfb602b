"""The method table (ectune.methods), the run owner's freezing, and the scoped RNG and engine settings.

Each training method is one entry; the CLI's --method choices come from it; a new entry trains
through the unchanged loop; schedule lengths that follow --steps are fixed when a run is created, by
the library (not the CLI); a run leaves the caller's global RNG as it found it.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from ectune import methods
from ectune.cli import build_parser
from ectune.data import load_dataset
from ectune.methods import METHODS, TUNE_METHODS, Method
from ectune.models import build_denoiser
from ectune.presets import preset
from ectune.rng import replayed, rng_state
from ectune.runs import train_run

CPU = torch.device("cpu")


@pytest.fixture
def blobs(tmp_path):
    path = tmp_path / "blobs.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (24, 1, 8, 8), dtype=np.uint8))
    return load_dataset(str(path)), str(path)


def _cfg(method: str, data: str, steps: int, **loss):
    cfg = preset("tiny", "pretrain" if method == "edm" else "tune")
    net = dataclasses.replace(cfg.net, img_resolution=8, in_channels=1)
    return dataclasses.replace(cfg, data=data, net=net, steps=steps, batch=4, ckpt_every=2, sample_every=10**6,
                               loss=dataclasses.replace(cfg.loss, method=method, **loss),
                               eval=dataclasses.replace(cfg.eval, every_kimg=0.0))


def test_the_table_is_the_cli_choices_and_the_kinds():
    choices = build_parser()._subparsers._group_actions[0].choices["tune"]._option_string_actions["--method"].choices
    assert list(choices) == list(TUNE_METHODS) == ["ect", "sct", "ict", "cd", "tcm", "cmt", "scm"]
    assert {m.name: m.kind for m in METHODS.values()} == {"edm": "pretrain", **{n: "tune" for n in TUNE_METHODS}}
    assert [n for n, m in METHODS.items() if m.start == "new"] == ["edm", "ict"]
    assert [n for n, m in METHODS.items() if m.frozen_teacher] == ["cd", "cmt"]


@pytest.mark.parametrize("method, field", [("ect", "stage_iters"), ("sct", "stage_iters"), ("cd", "stage_iters"),
                                           ("ict", "ict_total_steps")])
def test_train_run_freezes_the_schedule_at_creation_and_keeps_it(tmp_path, blobs, method, field):
    """6 steps in 2 stages: stages of 3 (iCT: a curriculum of 6); continued to 8 steps, they stay (not 4, 8)."""
    ds, spec = blobs
    cfg = _cfg(method, spec, 6, stages=2)
    value = {"stage_iters": math.ceil(6 / 2), "ict_total_steps": 6}[field]
    teacher = build_denoiser(cfg.net, 1) if method == "cd" else None
    r = train_run(cfg, tmp_path / "run", ds, build_denoiser(cfg.net), device=CPU, teacher=teacher, progress=False)
    assert (r.status, r.start_step, r.step) == ("trained", 0, 6)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"][field] == value
    longer = dataclasses.replace(cfg, steps=8)                 # continued with a larger budget
    r = train_run(longer, tmp_path / "run", ds, build_denoiser(cfg.net), device=CPU, teacher=teacher, progress=False)
    assert (r.status, r.start_step, r.step) == ("trained", 6, 8)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"][field] == value
    r = train_run(longer, tmp_path / "run", ds, build_denoiser(cfg.net), device=CPU, teacher=teacher, progress=False)
    assert r.status == "complete"


def test_a_new_method_is_one_entry(tmp_path, blobs, monkeypatch):
    """A toy objective (plain denoising at the ECT draws' t) trains through the loop once registered."""
    calls = []

    def loss(cfg, D, x0, labels, d, teacher=None):
        calls.append(d.step)
        return ((D(x0 + d.t.reshape(-1, 1, 1, 1) * d.noise, d.t) - x0) ** 2).flatten(1).sum(1)

    toy = Method("toy", "a test objective", METHODS["ect"].times, loss, start="new")
    monkeypatch.setitem(METHODS, "toy", toy)
    ds, spec = blobs
    cfg = _cfg("toy", spec, 3)
    r = train_run(cfg, tmp_path / "toy", ds, build_denoiser(cfg.net), device=CPU, progress=False)
    assert r.status == "trained" and calls == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown loss.method 'nope'"):
        methods.method("nope")


def test_a_run_leaves_the_callers_rng_as_it_was(tmp_path, blobs):
    ds, spec = blobs
    cfg = _cfg("ect", spec, 2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train_run(cfg, tmp_path / "run", ds, build_denoiser(cfg.net), device=CPU, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_replayed_draws_the_same_and_leaves_the_stream_where_it_was():
    torch.manual_seed(0)
    start = rng_state(CPU)
    first = torch.rand(5)
    with replayed(CPU, start):
        again = torch.rand(5)
    after = torch.rand(5)
    torch.manual_seed(0)
    torch.rand(5)
    assert torch.equal(first, again) and torch.equal(after, torch.rand(5))


def test_kind_follows_the_method_and_a_recorded_kind_must_agree():
    from ectune.config import RunConfig
    from ectune.errors import EctuneError
    cfg = preset("tiny", "tune")
    d = json.loads(cfg.to_json())
    assert d["kind"] == "tune" and list(d)[0] == "kind" and RunConfig.from_dict(d) == cfg
    assert dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, method="edm")).kind == "pretrain"
    assert RunConfig.from_dict({k: v for k, v in d.items() if k != "kind"}) == cfg     # kind is optional
    with pytest.raises(EctuneError, match="kind 'pretrain' disagrees with its loss.method 'ect'"):
        RunConfig.from_dict({**d, "kind": "pretrain"})


def test_the_method_is_the_presets_own_unless_given(tmp_path):
    """`tune --preset fmnist-short` tunes with its SCT recipe; --method overrides it; every other preset
    (and a teacher's recorded preset) keeps exact ECT."""
    from ectune.demo import shipped_teacher
    from ectune.start import tune_base
    teacher = str(shipped_teacher())
    short = tune_base(None, teacher, "fmnist-short", None, tmp_path / "a").cfg
    assert (short.loss.method, short.loss.P_mean, short.loss.P_std, short.ema.sigma_rel) == ("sct", -0.2, 2.4, 0.015)
    assert (short.sample.mid_ts, short.sample.gamma) == ((3.0,), 0.0)
    assert tune_base("ect", teacher, "fmnist-short", None, tmp_path / "b").cfg.loss.method == "ect"
    default = tune_base(None, teacher, None, None, tmp_path / "c").cfg
    assert default == tune_base("ect", teacher, None, None, tmp_path / "d").cfg
    assert (default.loss.method, default.loss.P_mean) == ("ect", -1.1)
    assert short.net == default.net and short.data == default.data
