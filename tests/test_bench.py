"""ectune.bench.tune_run: the benchmarks' tune runs through the library are the runs `ectune tune`
makes with the same settings (config.json and final weights equal), and a finished one is reused."""

import json

import numpy as np
import torch

from ectune.bench import tune_run
from ectune.checkpoint import read_weights
from ectune.cli import main
from ectune.demo import shipped_teacher


def _run_files(out):
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("teacher")
    return cfg, read_weights(out / "checkpoints" / "00000002" / "model.safetensors")[1]


def test_tune_run_is_the_cli_run_with_the_same_settings(tmp_path):
    teacher, fmnist_small = str(shipped_teacher()), str(tmp_path / "small.npz")
    images = np.random.default_rng(0).integers(0, 256, (32, 1, 28, 28), dtype=np.uint8)
    np.savez(fmnist_small, images=images)
    args = ["tune", "--method", "sct", "--teacher", teacher, "--data", fmnist_small, "--preset", "fmnist",
            "--steps", "2", "--batch", "4", "--seed", "3", "--set", "ckpt_every=50", "--set", "sample_every=2",
            "--set", "log_every=10", "--set", "loss.sct_refs=8", "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main(args) == 0
    out = tune_run(tmp_path / "lib", teacher, "sct", steps=2, batch=4, seed=3, data=fmnist_small,
                   overrides=["loss.sct_refs=8"])
    (cfg_a, w_a), (cfg_b, w_b) = _run_files(tmp_path / "cli"), _run_files(out)
    assert cfg_a == cfg_b and cfg_b["loss"]["stage_iters"] == 1      # frozen at creation: ceil(2 / 8)
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    stamp = (out / "log.jsonl").stat().st_mtime_ns
    assert tune_run(out, teacher, "sct", steps=2, batch=4, seed=3, data=fmnist_small) == out   # finished: kept
    assert (out / "log.jsonl").stat().st_mtime_ns == stamp


def test_a_signal_stops_a_benchmark_run_instead_of_scoring_it_unfinished(tmp_path):
    """SIGTERM during tune_run checkpoints and exits the process (SystemExit): no caller scores a run
    that stopped early (the same call continues it, as any run continues: test_resume)."""
    import os
    import signal
    import threading
    import time

    import pytest
    teacher, small = str(shipped_teacher()), str(tmp_path / "small.npz")
    np.savez(small, images=np.random.default_rng(0).integers(0, 256, (32, 1, 28, 28), dtype=np.uint8))
    kw = dict(steps=200, batch=4, seed=0, data=small, overrides=["loss.sct_refs=8", "ckpt_every=10"])
    log = tmp_path / "run" / "log.jsonl"

    def signal_once_it_trains():                # the first log record is step 10 (log_every=10)
        while not (log.exists() and log.stat().st_size):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
    thread = threading.Thread(target=signal_once_it_trains, daemon=True)
    thread.start()
    with pytest.raises(SystemExit, match="stopped at step .* of 200"):
        tune_run(tmp_path / "run", teacher, "sct", **kw)
    thread.join(5)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved and int(saved[-1]) < 200                     # checkpointed where it stopped, not finished


def test_a_benchmark_rebuilds_its_rows_from_the_cache_without_the_run(tmp_path, tiny_teacher, monkeypatch):
    """bench.consistency_rows trains and loads a LazyRun only for rows that are not cached: the first call
    makes the run once and scores it (the searched mid times stored in it); once the run folder is gone
    (a fresh clone), the same call returns the same rows, γ row and compute seconds from the cache alone."""
    import shutil

    import pytest

    from ectune import bench
    from ectune.midtime import stored_mid_times
    monkeypatch.setattr(bench, "fd_only", lambda x, ref: float(x.abs().mean()))         # cheap, deterministic
    monkeypatch.setattr(bench, "score_samples", lambda x, ref: {"fd": float(x.abs().mean())})
    run_dir = tmp_path / "runs" / "r"
    assert main(["tune", "--teacher", str(tiny_teacher / "teacher"), "--data", str(tiny_teacher / "d.npz"),
                 "--preset", "tiny", "--steps", "2", "--out", str(run_dir), "--no-progress"]) == 0
    cache, made = bench.RowCache(tmp_path / "out"), []
    run = bench.LazyRun(lambda: made.append(run_dir) or run_dir)
    first = bench.consistency_rows(cache, run, "r", [0, 1, 2], None, 2, gamma=True)
    assert made == [run_dir] and first["images"] == 2 * 16 and first["train_seconds"] > 0
    assert stored_mid_times(run_dir, 2) == first["mid_ts"] and first["1step"]["fd"] > 0
    assert stored_mid_times(run_dir, 2, first["gamma"]) == first["gamma_mid_ts"]

    shutil.rmtree(tmp_path / "runs")

    def gone():
        raise LookupError("the run was made again")
    again = bench.consistency_rows(cache, bench.LazyRun(gone), "r", [0, 1, 2], None, 2, gamma=True)
    assert again == json.loads(json.dumps(first))
    with pytest.raises(LookupError, match="made again"):        # a row not cached yet needs the run
        bench.consistency_rows(cache, bench.LazyRun(gone), "r", [0, 1, 2, 3], None, 2)
