"""Edge values on the command line: each is refused before any work with a one-line error naming the flag.

Nothing is written: the run folders keep every byte and no output file appears. (Bad data, checkpoints,
configs and run folders are in test_bad_input.py.)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ectune.cli import main

FAST = ["--batch", "8", "--set", "sample.grid=4", "--set", "sample.heun_steps=2", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Unlabelled and labelled 28x28 .npz files, an unconditional teacher, a conditional (3-class) teacher
    and a consistency model tuned from it."""
    root = tmp_path_factory.mktemp("edges")
    rng = np.random.default_rng(0)
    np.savez(root / "plain.npz", images=rng.integers(0, 256, (24, 28, 28), dtype=np.uint8))
    np.savez(root / "labelled.npz", images=rng.integers(0, 256, (24, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 3, 24))
    for name, data, extra in (("teacher", "plain.npz", []), ("cteacher", "labelled.npz", ["--cond"])):
        assert main(["pretrain", "--preset", "tiny", "--data", str(root / data), "--out", str(root / name),
                     "--steps", "2", *extra, *FAST]) == 0
    assert main(["tune", "--teacher", str(root / "cteacher"), "--out", str(root / "tuned"), "--steps", "1",
                 "--batch", "8", "--no-progress"]) == 0
    return root


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _refused(args: list[str], runs: Path, tmp: Path, capsys, *expected: str) -> None:
    """The CLI exits with 2 and one `ectune: error:` line naming each of `expected`; nothing changed."""
    before, made = _digests(runs), _listing(tmp)
    capsys.readouterr()
    assert main(args) == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("ectune: error: ") and "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    assert _digests(runs) == before
    assert _listing(tmp) == made, "an output was created"


def _pretrain(r, t, *more):
    return ["pretrain", "--preset", "tiny", "--data", str(r / "plain.npz"), "--out", str(t / "out"), *more, *FAST]


def _sample(r, t, *more, ckpt="tuned", out="s.png"):
    return ["sample", "--ckpt", str(r / ckpt), "--n", "2", "--out", str(t / out), *more]


def _eval(r, t, *more, out="e.json"):
    return ["eval", "--ckpt", str(r / "tuned"), "--n", "4", "--out", str(t / out), *more]


def _tune(r, t, *more):
    return ["tune", "--teacher", str(r / "tuned"), "--out", str(t / "out"), "--steps", "1", "--no-progress", *more]


CASES = {
    # pretrain: the budget, the labels, what it trains
    "kimg-nan": (lambda r, t: _pretrain(r, t, "--kimg", "nan"), ["--kimg"]),
    "kimg-inf": (lambda r, t: _pretrain(r, t, "--kimg", "inf"), ["--kimg"]),
    "kimg-0": (lambda r, t: _pretrain(r, t, "--kimg", "0"), ["--kimg"]),
    "kimg-negative": (lambda r, t: _pretrain(r, t, "--kimg", "-2"), ["--kimg"]),
    "cond-without-labels": (lambda r, t: _pretrain(r, t, "--cond"), ["--cond", "has none"]),
    "pretrain-kind-tune": (lambda r, t: _pretrain(r, t, "--set", "kind=tune"), ["--set kind=tune", "ectune tune"]),
    "pretrain-loss-ect": (lambda r, t: _pretrain(r, t, "--set", "loss.method=ect"),
                          ["--set loss.method=ect", "ectune tune"]),
    # tune: a consistency model is no teacher for ECT or CD
    "tune-from-tuned-ect": (lambda r, t: _tune(r, t), ["--teacher", "already a consistency model"]),
    "tune-from-tuned-cd": (lambda r, t: _tune(r, t, "--method", "cd"), ["--teacher", "already a consistency model"]),
    # sample: counts, times, labels, the output file
    "sample-n-0-npz": (lambda r, t: _sample(r, t, "--n", "0", out="s.npz"), ["--n"]),
    "sample-n-negative": (lambda r, t: _sample(r, t, "--n", "-3"), ["--n"]),
    "sample-steps-0": (lambda r, t: _sample(r, t, "--steps", "0"), ["--steps"]),
    "sample-batch-0": (lambda r, t: _sample(r, t, "--batch", "0"), ["--batch"]),
    "sample-out-no-suffix": (lambda r, t: _sample(r, t, out="x"), ["--out", ".png or .npz"]),
    "sample-out-txt": (lambda r, t: _sample(r, t, out="x.txt"), ["--out", ".png or .npz"]),
    "sample-out-folder": (lambda r, t: ((t / "d.png").mkdir(), _sample(r, t, out="d.png"))[1], ["--out", "folder"]),
    "sample-ts-nan": (lambda r, t: _sample(r, t, "--ts", "nan"), ["--ts"]),
    "sample-ts-inf": (lambda r, t: _sample(r, t, "--ts", "inf"), ["--ts"]),
    "sample-ts-increasing": (lambda r, t: _sample(r, t, "--ts", "1.5", "80"), ["--ts", "decreasing"]),
    "sample-ts-above-tmax": (lambda r, t: _sample(r, t, "--ts", "100", "1"), ["--ts", "t_max=80"]),
    "sample-ts-and-steps": (lambda r, t: _sample(r, t, "--ts", "80", "1", "--steps", "2"), ["--ts", "--steps"]),
    "sample-ts-with-heun": (lambda r, t: _sample(r, t, "--sampler", "heun", "--ts", "80", "1"),
                            ["--ts", "heun", "--sampler consistency"]),
    "sample-nfe-with-heun": (lambda r, t: _sample(r, t, "--sampler", "heun", "--nfe", "3"),
                             ["--nfe", "heun", "--sampler dpmpp2m"]),
    "sample-label-unconditional": (lambda r, t: _sample(r, t, "--label", "1", ckpt="teacher"),
                                   ["--label", "unconditional"]),
    "sample-label-too-large": (lambda r, t: _sample(r, t, "--label", "3"), ["--label", "[0, 3)"]),
    "sample-label-negative": (lambda r, t: _sample(r, t, "--label", "-1"), ["--label", "[0, 3)"]),
    # eval: the same checks, its JSON output and the mid-time search
    "eval-steps-0": (lambda r, t: _eval(r, t, "--steps", "0"), ["--steps"]),
    "eval-ts-increasing": (lambda r, t: _eval(r, t, "--ts", "1.5", "80"), ["--ts", "decreasing"]),
    "eval-ts-nan": (lambda r, t: _eval(r, t, "--ts", "80", "nan"), ["--ts"]),
    "eval-ts-above-tmax": (lambda r, t: _eval(r, t, "--ts", "81"), ["--ts", "t_max"]),
    "eval-ts-and-steps": (lambda r, t: _eval(r, t, "--ts", "80", "--steps", "1"), ["--ts", "--steps"]),
    "eval-num-steps-with-consistency": (lambda r, t: _eval(r, t, "--sampler", "consistency", "--num-steps", "4"),
                                        ["--num-steps", "consistency", "--sampler heun"]),
    "eval-out-png": (lambda r, t: _eval(r, t, out="e.png"), ["--out", ".json"]),
    "eval-search-n-0": (lambda r, t: _eval(r, t, "--steps", "2", "--search-mid-t", "--search-n", "0"),
                        ["--search-n"]),
    "eval-candidates-nan": (lambda r, t: _eval(r, t, "--steps", "2", "--search-mid-t", "--candidates", "nan"),
                            ["--candidates"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_before_any_work(case, runs, tmp_path, capsys):
    make, expected = CASES[case]
    _refused(make(runs, tmp_path), runs, tmp_path, capsys, *expected)


def _unwritable(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_output_in_a_folder_without_write_permission(command, runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "mkstemp", _unwritable)        # (root writes into read-only folders)
    args = (_sample(runs, tmp_path, out="sub/s.png") if command == "sample" else
            _eval(runs, tmp_path, out="sub/e.json"))
    _refused(args, runs, tmp_path, capsys, "--out", "cannot write", "Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_a_really_read_only_folder(runs, tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    try:
        _refused(_sample(runs, tmp_path, out="ro/s.npz"), runs, tmp_path, capsys, "--out", "cannot write")
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_valid_times_and_outputs_still_work(runs, tmp_path, capsys):
    assert main(_sample(runs, tmp_path, "--ts", "80", "1.5", "--label", "2", out="new/a.npz")) == 0
    assert main(_sample(runs, tmp_path, "--steps", "2", out="b.PNG")) == 0
    assert (tmp_path / "new" / "a.npz").is_file() and (tmp_path / "b.PNG").is_file()
    assert not [p for p in tmp_path.rglob(".ectune-probe-*")]


def test_closed_stdout_pipe_exits_quietly():
    """`ectune presets --show tiny | head -1`: the reader goes away; no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "ectune.cli", "presets", "--show", "tiny"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                                             # before ectune has written anything
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(timeout=120) == 141 and err == "", err


@pytest.mark.parametrize("cmd", ["pretrain", "tune", "sample", "eval"])
def test_help_shows_defaults(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert "(default: auto)" in out, out
    if cmd in ("sample", "eval"):
        assert "(default: 18)" in out and "(default: ema)" in out


def test_cond_with_sparse_label_values_is_refused(runs, tmp_path, capsys):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "sparse.npz", images=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
             labels=np.array([0, 1, 10**6, 0, 1, 10**6, 0, 1]))
    args = ["pretrain", "--preset", "tiny", "--data", str(tmp_path / "sparse.npz"), "--cond",
            "--out", str(tmp_path / "out"), *FAST]
    _refused(args, runs, tmp_path, capsys, "--cond", "up to 1000000", "renumber")


def test_a_full_disk_during_a_grid_write_warns_and_training_goes_on(runs, tmp_path, capsys, monkeypatch):
    import errno

    import ectune.training as training

    def full(*_args, **_kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(training, "save_samples", full)
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--data", str(runs / "plain.npz"), "--out", str(out),
                 "--steps", "2", "--set", "sample_every=1", *FAST]) == 0
    err = capsys.readouterr().err
    assert "could not write the step-1 sample grid" in err and "No space left" in err and "Traceback" not in err
    assert (out / "checkpoints" / "00000002" / "model.safetensors").is_file()


def test_the_mid_time_search_reports_progress(runs, tmp_path, capsys):
    assert main(["eval", "--ckpt", str(runs / "tuned"), "--n", "4", "--steps", "2", "--search-mid-t",
                 "--candidates", "0.5", "2", "--search-n", "4", "--ref-data", "fashion-mnist", "--no-progress",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert "mid-time search: 8/8" in capsys.readouterr().err
