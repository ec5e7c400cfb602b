"""Watching a run: in-loop evaluation rows (cadence, resume, untouched training stream) and TensorBoard."""

import json
import subprocess
import sys

import pytest
import torch

from ectune.checkpoint import read_weights
from ectune.cli import main

BASE = ["--preset", "tiny", "--data", "fashion-mnist", "--batch", "8", "--steps", "6", "--set", "ckpt_every=4",
        "--set", "sample_every=3", "--set", "sample.grid=4", "--set", "sample.heun_steps=2", "--no-progress"]
EVAL = ["--set", "eval.every_kimg=0.016", "--set", "eval.n=8"]          # every 2 steps of 8 images


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("mon") / "teacher"
    assert main(["pretrain", *BASE, "--steps", "2", "--set", "engine.tensorboard=off", "--out", str(out)]) == 0
    return out


def _tune(teacher, out, *more):
    return main(["tune", "--teacher", str(teacher), *BASE, *more, "--out", str(out)])


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rows_at_the_cadence_and_training_unchanged(teacher, tmp_path):
    assert _tune(teacher, tmp_path / "plain", "--set", "engine.tensorboard=off") == 0
    assert _tune(teacher, tmp_path / "eval", *EVAL, "--set", "eval.weights=both") == 0
    got = rows(tmp_path / "eval")
    assert [(r["step"], r["weights"], r["nfe"]) for r in got] == [
        (s, w, n) for s in (2, 4, 6) for w in ("ema", "net") for n in (1, 2)]
    assert all(r["metric"] == "classifier" and r["n"] == 8 and r["fd"] > 0 for r in got)
    assert got[0]["kimg"] == 0.016 and got[-1]["sampler"] == "consistency-2"
    _, a, _ = read_weights(tmp_path / "plain")
    _, b, _ = read_weights(tmp_path / "eval")
    assert all(torch.equal(a[k], b[k]) for k in a)               # the training RNG stream is untouched
    assert not (tmp_path / "plain" / "metrics.jsonl").exists()


def test_a_killed_run_resumes_with_every_row_once(teacher, tmp_path, monkeypatch):
    import ectune.training as training
    assert _tune(teacher, tmp_path / "ref", *EVAL, "--set", "engine.tensorboard=off") == 0
    real_save = training.save

    def dies_at_6(run_dir, cfg, s):                                # killed after step 6's row, before its checkpoint
        if s.step == 6:
            raise SystemExit(137)
        return real_save(run_dir, cfg, s)
    monkeypatch.setattr(training, "save", dies_at_6)
    with pytest.raises(SystemExit):
        _tune(teacher, tmp_path / "cut", *EVAL, "--set", "engine.tensorboard=off")
    assert [r["step"] for r in rows(tmp_path / "cut")] == [2, 2, 4, 4, 6, 6]
    monkeypatch.setattr(training, "save", real_save)
    assert _tune(teacher, tmp_path / "cut", *EVAL, "--set", "engine.tensorboard=off") == 0   # resumes from 4
    want, got = rows(tmp_path / "ref"), rows(tmp_path / "cut")
    assert [(r["step"], r["nfe"], r["fd"]) for r in got] == [(r["step"], r["nfe"], r["fd"]) for r in want]


def test_classifier_metric_on_other_data_is_refused_at_start(teacher, tmp_path, capsys):
    import numpy as np
    np.savez(tmp_path / "d.npz", images=np.zeros((16, 28, 28), dtype=np.uint8))
    args = ["tune", "--teacher", str(teacher), *BASE, *EVAL, "--data", str(tmp_path / "d.npz"), "--out",
            str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "eval.metric=inception" in err and "eval.every_kimg=0" in err and not (tmp_path / "x").exists()


def test_tensorboard_events_hold_the_scalars_and_grids(teacher, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert _tune(teacher, tmp_path / "tb", *EVAL, "--set", "log_every=1", "--set", "engine.tensorboard=on") == 0
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/stage", "train/img_per_s", "train/nonfinite_skipped",
            "train/dt_over_t_q10", "train/dt_over_t_q50", "train/dt_over_t_q90",
            "eval/classifier_ema_consistency-1", "eval/classifier_ema_consistency-2"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    fd = [e.value for e in acc.Scalars("eval/classifier_ema_consistency-2")]
    assert fd == pytest.approx([r["fd"] for r in rows(tmp_path / "tb") if r["nfe"] == 2])
    assert {"samples/1step", "samples/2step"} <= set(acc.Tags()["images"])


def test_without_tensorboard_nothing_breaks_and_nothing_is_imported(teacher, tmp_path):
    code = f"""
import sys
import ectune.monitor
ectune.monitor.have_tensorboard = lambda: False
from ectune.cli import main
assert main({["tune", "--teacher", str(teacher), *BASE, "--out", str(tmp_path / "no-tb")]!r}) == 0
assert not any(m.split(".")[0] == "tensorboard" or m == "torch.utils.tensorboard" for m in sys.modules)
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    assert not (tmp_path / "no-tb" / "tensorboard").exists()


def test_report_of_a_run_with_in_loop_evaluation(teacher, tmp_path):
    out = tmp_path / "run"
    assert _tune(teacher, out, *EVAL, "--set", "log_every=1", "--set", "engine.tensorboard=off") == 0
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert (out / "loss.png").is_file() and (out / "quality.png").is_file()
    assert "48 images" in text and "ECT stages of 1 iterations" in text and "consistency-2" in text
    assert "| eval.every_kimg | 0.0 | 0.016 |" in text and "samples/2step-00000006.png" in text


def test_report_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
