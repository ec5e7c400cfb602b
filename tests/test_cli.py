"""End to end through the CLI on a tiny model: pretrain → tune → sample, resume, and bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ectune.checkpoint import list_checkpoints, read_weights
from ectune.cli import main


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory):
    """48 blurry blobs, 28x28 grayscale, with labels: enough for a few steps of training."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    imgs = []
    for _ in range(48):
        cy, cx, r = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(3, 8)
        imgs.append(255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, images=np.array(imgs, dtype=np.uint8), labels=rng.integers(0, 3, 48))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, npz_data):
    root = tmp_path_factory.mktemp("runs")
    assert main(["pretrain", "--preset", "tiny", "--data", npz_data, "--out", str(root / "teacher"),
                 "--steps", "6", "--set", "log_every=2", "--set", "sample_every=6", "--no-progress"]) == 0
    assert main(["tune", "--teacher", str(root / "teacher"), "--out", str(root / "ect"), "--steps", "8",
                 "--batch", "8", "--set", "log_every=1", "--set", "ckpt_every=4", "--no-progress"]) == 0
    return root


def test_run_folders_hold_config_log_grids_and_checkpoints(runs):
    for name, n_steps in (("teacher", 6), ("ect", 8)):
        run = runs / name
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["kind"] == ("pretrain" if name == "teacher" else "tune")
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == n_steps and all(np.isfinite(r["loss"]) for r in log)
        assert list((run / "samples").glob("*.png"))
        assert list_checkpoints(run)[-1].name == f"{n_steps:08d}"


def test_tune_logs_stages_and_freezes_the_schedule(runs):
    log = [json.loads(line) for line in (runs / "ect" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [s // 1 for s in range(8)]        # 8 steps / 8 stages = 1 it per stage
    cfg = json.loads((runs / "ect" / "config.json").read_text())
    assert cfg["loss"]["method"] == "ect" and cfg["loss"]["stage_iters"] == 1


def test_tune_starts_from_teacher_ema(runs, npz_data, tmp_path):
    _, teacher, _ = read_weights(runs / "teacher")
    assert main(["tune", "--teacher", str(runs / "teacher"), "--out", str(tmp_path / "e0"), "--steps", "1",
                 "--set", "optim.lr=0", "--no-progress"]) == 0
    _, tuned, _ = read_weights(tmp_path / "e0")
    for k, v in teacher.items():
        if k.startswith("ema."):
            torch.testing.assert_close(tuned["net." + k[4:]], v)


def test_sample_png_and_npz(runs, tmp_path):
    assert main(["sample", "--ckpt", str(runs / "ect"), "--steps", "2", "--n", "6", "--out", str(tmp_path / "g.png")]) == 0
    with Image.open(tmp_path / "g.png") as im:
        assert im.size[0] > 28
    ckpt_file = list_checkpoints(runs / "teacher")[-1] / "model.safetensors"
    assert main(["sample", "--ckpt", str(ckpt_file), "--sampler", "heun", "--num-steps", "3", "--n", "5",
                 "--seed", "10", "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (5, 1, 28, 28) and z["images"].dtype == np.uint8
        assert z["seeds"].tolist() == [10, 11, 12, 13, 14]


def test_same_seed_same_samples(runs, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    main(["sample", "--ckpt", str(runs / "ect"), "--steps", "2", "--n", "4", "--seed", "3", "--out", str(a)])
    main(["sample", "--ckpt", str(runs / "ect"), "--steps", "2", "--n", "2", "--seed", "5", "--out", str(b)])
    with np.load(a) as za, np.load(b) as zb:
        assert np.array_equal(za["images"][2:], zb["images"])


def test_resume_continues_a_run(runs, npz_data, tmp_path):
    out = str(tmp_path / "t")
    args = ["pretrain", "--preset", "tiny", "--data", npz_data, "--out", out, "--set", "ckpt_every=3", "--no-progress"]
    assert main(args + ["--steps", "3"]) == 0
    assert main(args + ["--steps", "6"]) == 0
    log = [json.loads(line) for line in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and list_checkpoints(tmp_path / "t")[-1].name == "00000006"


def test_cd_resumes_only_with_its_own_teacher(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cd"
    args = ["--method", "cd", "--out", str(out), "--batch", "8", "--set", "ckpt_every=1", "--no-progress"]
    assert main(["tune", "--teacher", str(runs / "teacher"), "--steps", "1", *args]) == 0
    monkeypatch.chdir(runs)
    assert main(["tune", "--teacher", "teacher", "--steps", "2", *args]) == 0    # the same file, relative
    assert list_checkpoints(out)[-1].name == "00000002"
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["tune", "--teacher", "ect", "--steps", "3", *args]) == 2        # another teacher
    assert "differs in ['teacher']" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_interrupted_and_resumed_run_matches_uninterrupted(npz_data, tmp_path, monkeypatch):
    import ectune.training as training
    common = ["pretrain", "--preset", "tiny", "--data", npz_data, "--steps", "6", "--set", "ckpt_every=100",
              "--set", "net.dropout=0.2",
              "--set", "sample_every=100", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "full")]) == 0
    real_loss = training.batch_loss

    def interrupting(cfg, D, x0, labels, draws, teacher=None):     # a SIGINT arrives during step 3
        if draws.step == 3 and not getattr(interrupting, "done", False):
            interrupting.done = True
            import os, signal
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(cfg, D, x0, labels, draws, teacher)

    monkeypatch.setattr(training, "batch_loss", interrupting)
    assert main(common + ["--out", str(tmp_path / "cut")]) == 130
    assert list_checkpoints(tmp_path / "cut")[-1].name == "00000004"     # the step in flight completes
    assert main(common + ["--out", str(tmp_path / "cut")]) == 0
    _, a, _ = read_weights(tmp_path / "full")
    _, b, _ = read_weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_inputs_give_one_line_errors(runs, npz_data, tmp_path, capsys):
    cases = [
        ["pretrain", "--data", str(tmp_path / "missing"), "--preset", "tiny", "--out", str(tmp_path / "x")],
        ["pretrain", "--data", npz_data, "--preset", "nope", "--out", str(tmp_path / "x")],
        ["pretrain", "--data", npz_data, "--preset", "tiny", "--set", "loss.qq=3", "--out", str(tmp_path / "x")],
        ["pretrain", "--data", npz_data, "--preset", "tiny", "--set", "batch=abc", "--out", str(tmp_path / "x")],
        ["tune", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
        ["sample", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "g.png")],
        ["pretrain", "--data", npz_data, "--preset", "tiny", "--set", "optim.lr=1", "--out", str(runs / "teacher")],
    ]
    for args in cases:
        assert main(args + ["--no-progress"] * (args[0] != "sample")) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("ectune: error:") and "\n" not in err, err
    assert not (tmp_path / "x").exists()


def test_tune_rejects_data_of_another_shape(runs, tmp_path):
    path = tmp_path / "rgb.npz"
    np.savez(path, images=np.zeros((8, 32, 32, 3), dtype=np.uint8))
    assert main(["tune", "--teacher", str(runs / "teacher"), "--data", str(path), "--out", str(tmp_path / "y"),
                 "--no-progress"]) == 2
    assert not (tmp_path / "y").exists()


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "g.png")]) == 2


@pytest.mark.parametrize("cmd", ["pretrain", "tune", "sample", "eval", "demo", "presets", "download"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: ectune" in capsys.readouterr().out
