"""Issue #15 feedback: eval names (and fits) its reference, progress on long steps, help and errors that
name the user's flags."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import ectune.models
from ectune.cli import build_parser, main
from ectune.cliargs import check_overrides
from ectune.demo import shipped_teacher
from ectune.errors import EctuneError
from ectune.evaluate import classifier_reference_spec, is_fashion_mnist
from ectune.progress import Progress
from ectune.sampling import Sampler, sample_images
from test_demo import _have_fmnist


needs_fmnist = pytest.mark.skipif(not _have_fmnist(), reason="Fashion-MNIST not installed")
FAST = ["--sampler", "dpmpp2m", "--nfe", "1", "--n", "8"]


@pytest.fixture
def trained_on(monkeypatch):
    """Make the shipped teacher look as if it had been trained on `data` (its config's data field)."""
    load = ectune.models.load_denoiser

    def set_data(data):
        def fake(*args, **kwargs):
            D, cfg = load(*args, **kwargs)
            return D, replace(cfg, data=data)
        monkeypatch.setattr(ectune.models, "load_denoiser", fake)
    return set_data


def _eval(tmp_path, *more):
    return ["eval", "--ckpt", str(shipped_teacher()), *FAST, "--out", str(tmp_path / "e.json"), *more]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("ectune: error: ") and "\n" not in err, err
    return err


# --- 1. the reference: named, and fitting the run's data
def test_fashion_mnist_specs_are_recognised(tmp_path):
    assert all(is_fashion_mnist(s) for s in ("fashion-mnist", "FMNIST", "fashion-mnist:/x",
                                             "fashion-mnist[classes=0,2]"))
    assert not any(is_fashion_mnist(s) for s in ("", "cifar10", "digits", str(tmp_path / "d.npz"), str(tmp_path)))


def test_reference_spec_decisions():
    assert classifier_reference_spec("fashion-mnist", None, "c") == ("fashion-mnist", None)
    assert classifier_reference_spec("fashion-mnist:/elsewhere[classes=2,0]", None, "c") == \
        ("fashion-mnist[classes=0,2]", None)                # same classes, from where it is installed here
    spec, note = classifier_reference_spec("", None, "c")   # diffusers / imported: no data recorded
    assert spec == "fashion-mnist" and "--ref-data fashion-mnist" in note
    assert classifier_reference_spec("", "fmnist", "c") == ("fmnist", None)
    assert classifier_reference_spec("my.npz", "fashion-mnist", "c") == ("fashion-mnist", None)   # confirmed
    for data, ref in (("my.npz", None), ("cifar10", None), ("fashion-mnist", "my.npz"), ("", "digits")):
        with pytest.raises(EctuneError, match="--metric inception"):
            classifier_reference_spec(data, ref, "c")


def test_eval_on_other_data_is_refused(trained_on, tmp_path, capsys):
    trained_on(str(tmp_path / "mine.npz"))
    assert main(_eval(tmp_path)) == 2
    err = _one_line_error(capsys)
    assert "mine.npz" in err and "--metric inception" in err and "--ref-data fashion-mnist" in err, err
    assert not (tmp_path / "e.json").exists()


def test_classifier_metric_refuses_other_ref_data(tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", images=np.zeros((4, 28, 28), np.uint8))
    assert main(_eval(tmp_path, "--ref-data", str(tmp_path / "ref.npz"))) == 2
    err = _one_line_error(capsys)
    assert "--ref-data" in err and "ref.npz" in err and "--metric inception" in err, err


def test_inception_without_any_data_names_ref_data(trained_on, tmp_path, capsys):
    trained_on("")
    assert main(_eval(tmp_path, "--metric", "inception")) == 2
    assert "--ref-data" in _one_line_error(capsys)


@needs_fmnist
def test_eval_names_its_reference(tmp_path, capsys):
    assert main(_eval(tmp_path, "--no-progress")) == 0
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["reference_images"] == 10000 and "fashion-mnist" in r["reference"]
    assert f"vs {r['reference']}" in capsys.readouterr().out


@needs_fmnist
def test_eval_confirmed_fashion_mnist_on_other_data(trained_on, tmp_path, capsys):
    trained_on(str(tmp_path / "mine.npz"))
    assert main(_eval(tmp_path, "--ref-data", "fashion-mnist", "--no-progress")) == 0
    assert json.loads((tmp_path / "e.json").read_text())["reference_images"] == 10000


@needs_fmnist
def test_eval_of_a_class_subset_is_scored_against_those_classes(trained_on, tmp_path, capsys):
    trained_on("fashion-mnist[classes=0,2]")
    assert main(_eval(tmp_path, "--no-progress")) == 0
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["reference_images"] == 2000 and "classes=0,2" in r["reference"]
    assert "classes=0,2" in capsys.readouterr().out


@needs_fmnist
def test_eval_of_a_model_without_data_says_so(trained_on, tmp_path, capsys):
    trained_on("")
    assert main(_eval(tmp_path, "--no-progress")) == 0
    assert "ectune: note:" in capsys.readouterr().err
    assert main(_eval(tmp_path, "--no-progress", "--ref-data", "fashion-mnist")) == 0
    assert "note" not in capsys.readouterr().err


# --- 2. progress
def test_progress_lines_every_tenth():
    out = io.StringIO()
    with Progress(100, "sampling", bar=False, file=out) as p:
        for _ in range(200):
            p.update(0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("sampling: 100/100 img (100%"), lines


def test_progress_quiet_and_bar():
    out = io.StringIO()
    with Progress(10, "x", bar=False, file=out, quiet=True) as p:
        p.update(10)
    assert out.getvalue() == ""
    with Progress(10, "feats", bar=True, file=out) as p:
        p.update(2.5)
        p.update(2.5)
        assert p._bar.n == 5
    assert "feats" in out.getvalue()


def test_sample_images_advances_progress_by_samples(gaussian_denoiser):
    class Count:
        done = 0.0

        def update(self, n):
            self.done += n
    for sampler, calls in ((Sampler.heun(3), 5), (Sampler.dpmpp2m(4), 4), (Sampler.consistency([80.0, 1.0]), 2)):
        c = Count()
        gaussian_denoiser.calls.clear()
        sample_images(gaussian_denoiser, list(range(5)), (1, 2, 2), sampler, batch=2, progress=c)
        assert c.done == pytest.approx(5) and len(gaussian_denoiser.calls) == 3 * calls


def test_sample_shows_progress(tmp_path, capsys):
    args = ["sample", "--ckpt", str(shipped_teacher()), *FAST, "--out", str(tmp_path / "s.npz")]
    assert main([*args, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "sampling: 8/8 img (100%" in err and "\r" not in err, err
    assert main(args) == 0
    assert "sampling: 100%" in capsys.readouterr().err        # the tqdm bar


def test_synth_reports_lines_without_a_bar(tmp_path, capsys):
    assert main(["synth", "--teacher", str(shipped_teacher()), "--sampler", "dpmpp2m", "--nfe", "1", "--n", "4",
                 "--batch", "2", "--out", str(tmp_path / "t.npz"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "synth: 2/4 img (50%" in err and "synth: 4/4 img (100%" in err and "\r" not in err, err


def test_inception_feature_pass_reports_lines(capsys):
    import ectune.metrics.inception as inc

    class Net(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :4].float()
    x = torch.zeros(20, 1, 8, 8, dtype=torch.uint8)
    mp = pytest.MonkeyPatch()
    mp.setattr(inc, "load_inception", lambda weights, device: Net())
    try:
        inc.inception_stats(x, batch=5, progress="lines", desc="inception features of the samples")
        assert "inception features of the samples: 20/20 img (100%" in capsys.readouterr().err
        inc.inception_stats(x, batch=5)                          # library default: silent
        assert capsys.readouterr().err == ""
    finally:
        mp.undo()


# --- 3. help and error messages
def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    for name in sub.choices:
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(name + " ")), None)
        assert line is not None and len(line.split()) > 1, (name, out)


def test_data_help_lists_what_works(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for word in ("fashion-mnist", "cifar10", "DIR of images", ".zip", ".npz", "digits (needs scikit-learn)"):
        assert word in out, word


@pytest.mark.parametrize("make, words", [
    (lambda: dict(sampler=Sampler.consistency(), batch=0), ["--batch"]),
    (lambda: dict(sampler=Sampler.dpmpp2m(0)), ["--nfe"]),
    (lambda: dict(sampler=Sampler.heun(0)), ["--num-steps"]),
    (lambda: dict(sampler=Sampler("euler", (80.0, 0.0))), ["--sampler"])])
def test_sampler_errors_name_the_flag(make, words, gaussian_denoiser):
    with pytest.raises(ValueError) as e:
        sample_images(gaussian_denoiser, [0], (1, 2, 2), **make())
    assert all(w in str(e.value) for w in words) and "range()" not in str(e.value), e.value


def test_no_seeds_is_no_bare_torch_cat_error(gaussian_denoiser):
    with pytest.raises(ValueError, match="--n"):
        sample_images(gaussian_denoiser, [], (1, 2, 2), Sampler.consistency())


@pytest.mark.parametrize("item, words", [
    ("net.channel_mult=[1,2", ["--set net.channel_mult=[1,2", "brackets", "[1,2,2]"]),
    ("optim.lr=nan", ["--set optim.lr=nan", "nan and inf are not allowed", "e.g. --set optim.lr="]),
    ("optim.lr=inf", ["inf"]), ("optim.betas=[0.9,-inf]", ["nan and inf"])])
def test_bad_set_values(item, words, tmp_path, capsys):
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "o"), "--set", item]) == 2
    err = _one_line_error(capsys)
    assert all(w in err for w in words) and "got '[1'" not in err, err
    assert not (tmp_path / "o").exists()


def test_set_takes_a_bracketed_list():
    assert check_overrides(["net.channel_mult=[1,2,2]", "optim.lr=2e-4", "data=x[1"]) == \
        ["net.channel_mult=1,2,2", "optim.lr=2e-4", "data=x[1"]


def test_download_has_the_base_url_it_mentions(tmp_path, capsys, monkeypatch):
    import urllib.request
    asked = []

    def offline(url, timeout=None):
        asked.append(url)
        raise OSError("offline")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["download", "fashion-mnist", "--dest", str(tmp_path), "--base-url", "http://mirror.test/f"]) == 2
    err = _one_line_error(capsys)
    assert asked[0].startswith("http://mirror.test/f/") and "--base-url" in err, err
    with pytest.raises(SystemExit):
        main(["download", "--help"])
    assert "--base-url" in capsys.readouterr().out


def test_digits_without_sklearn_says_how(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["pretrain", "--preset", "tiny", "--data", "digits", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "digits" in err and "pip install scikit-learn" in err, err
