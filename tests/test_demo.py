"""The shipped teacher and the demo path (on a tiny budget)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from ectune.checkpoint import read_weights
from ectune.demo import shipped_teacher
from ectune.models import build_denoiser, load_denoiser
from ectune.networks import count_parameters


def test_shipped_teacher_loads_and_config_matches_weights():
    cfg, tensors, meta = read_weights(shipped_teacher())
    assert cfg.kind == "pretrain" and cfg.net.img_resolution == 28 and cfg.net.in_channels == 1
    D = build_denoiser(cfg.net)
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    assert set(ema) == set(D.state_dict()) and all(ema[k].shape == v.shape for k, v in D.state_dict().items())
    D, _ = load_denoiser(shipped_teacher())
    assert count_parameters(D) == sum(v.numel() for k, v in ema.items() if k in dict(D.named_parameters()))
    x = D(torch.randn(2, 1, 28, 28) * 80, torch.full((2,), 80.0))
    assert torch.isfinite(x).all()


def test_shipped_teacher_card_matches_file():
    card = json.loads((Path(shipped_teacher()).with_suffix(".json")).read_text())
    assert hashlib.sha256(Path(shipped_teacher()).read_bytes()).hexdigest() == card["sha256"]
    assert card["images"] == card["steps"] * card["batch"]
    assert Path(shipped_teacher()).stat().st_size < 10 * 2**20


def _have_fmnist():
    from ectune.data import load_fashion_mnist
    from ectune.errors import EctuneError
    try:
        load_fashion_mnist(split="test")
        return True
    except EctuneError:
        return False


@pytest.mark.skipif(not _have_fmnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path):
    from ectune.cli import main
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--n", "24", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert sorted((r["sampler"].split("-")[0], r["nfe"]) for r in rows if r["model"] == "teacher") == \
        [("dpmpp2m", 5)]
    tuned = {(r["weights"], r["nfe"], r["gamma"]) for r in rows if r["model"] == "tuned"}
    assert tuned == {("ema", 1, 1.0), ("ema", 2, 0.0)}
    assert report["gamma"] == 0.0 and "γ 0" in report["recipe"]
    for r in rows:
        assert r["fd"] >= 0 and r["seconds_per_image"] > 0 and r["sampler"]
    assert report["tune_steps"] == 3
    assert (out / "grid.png").is_file() and (out / "report.md").is_file()
    assert "| teacher |" in (out / "report.md").read_text()
    # a folder that holds something else is refused before any work, and left as it was
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "other"), "--steps", "3", "--n", "24", "--no-progress"]) == 2
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    # --full: the same folder again (a previous demo is redone), with every row
    assert main(["demo", "--out", str(out), "--steps", "2", "--n", "12", "--full", "--no-progress"]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert len(rows) == 8 and {r["weights"] for r in rows if r["model"] == "tuned"} == {"ema", "online"}


@pytest.mark.skipif(not _have_fmnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_eval_writes_metrics_with_provenance(tmp_path):
    from ectune.cli import main
    from ectune.evaluate import file_sha256
    from ectune.metrics import classifier_hash
    out = tmp_path / "r.json"
    assert main(["eval", "--ckpt", str(shipped_teacher()), "--sampler", "heun", "--num-steps", "3", "--n", "30",
                 "--seed", "5", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["fd"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert r["sampler"] == {"name": "heun", "num_steps": 3, "nfe": 5}
    assert r["seeds"] == [5, 35] and r["num_samples"] == 30
    assert r["checkpoint_sha256"] == file_sha256(shipped_teacher())
    assert r["feature_network_sha256"] == classifier_hash() and len(r["reference_stats_sha256"]) == 64


def test_demo_full_adds_the_teachers_converged_rows_gamma_1_and_the_online_weights():
    from ectune.demo import _rows_to_run, eval_nfe
    rows = [(m, w, s.name, s.nfe, s.gamma) for m, w, s in _rows_to_run([3.0], 0.0, full=True)]
    assert rows == [("teacher", "ema", "dpmpp2m", 5, 1.0), ("teacher", "ema", "dpmpp2m", 9, 1.0),
                    ("teacher", "ema", "dpmpp2m", 17, 1.0), ("tuned", "ema", "consistency", 1, 1.0),
                    ("tuned", "ema", "consistency", 2, 0.0), ("tuned", "ema", "consistency", 2, 1.0),
                    ("tuned", "online", "consistency", 1, 1.0), ("tuned", "online", "consistency", 2, 0.0)]
    assert [(m, s.nfe, s.gamma) for m, _, s in _rows_to_run([3.0], 1.0, full=True)].count(("tuned", 2, 1.0)) == 2
    assert (eval_nfe(), eval_nfe(full=True)) == (5 + 1 + 2, 31 + 1 + 2 + 2 + 1 + 2)
