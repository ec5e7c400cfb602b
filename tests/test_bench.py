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
