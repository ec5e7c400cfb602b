"""TCM's second stage (`--method tcm`): the heavy-tailed truncated t, the truncated denoiser, the
boundary rows and their weight, and a stage-1 ECT run continued through the CLI (resumable exactly)."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ectune.checkpoint import read_weights
from ectune.cli import main
from ectune.methods import METHODS
from ectune.precond import Truncated
from ectune.presets import preset
from ectune.schedules import truncated_t_sigma


def test_truncated_t_matches_scipys_distribution():
    stats = pytest.importorskip("scipy.stats")
    for mu, s, df, lo, hi in [(0.0, 0.2, 0.01, 1.0, 80.0), (-0.5, 1.0, 3.0, 0.05, 20.0)]:
        x = truncated_t_sigma(40000, mu, s, df, lo, hi, generator=torch.Generator().manual_seed(0)).double()
        assert float(x.min()) >= lo * (1 - 1e-6) and float(x.max()) <= hi * (1 + 1e-6)
        a, b = stats.t.cdf((math.log(lo) - mu) / s, df), stats.t.cdf((math.log(hi) - mu) / s, df)
        ks = stats.kstest(np.log(x.numpy()), lambda y: (stats.t.cdf((y - mu) / s, df) - a) / (b - a)).statistic
        assert ks < 0.01                                        # 40k draws: 1.63/sqrt(n) = 0.008 at p = 0.01
    g = [torch.Generator().manual_seed(3) for _ in range(2)]
    assert torch.equal(truncated_t_sigma(5, 0, 0.2, 0.01, 1, 80, generator=g[0]),
                       truncated_t_sigma(5, 0, 0.2, 0.01, 1, 80, generator=g[1]))


class _Scale(torch.nn.Module):
    """D(x, σ) = w·x with dropout on the output: enough to see routing, gradients and masks."""

    def __init__(self, w: float, p: float = 0.5):
        super().__init__()
        self.w, self.drop = torch.nn.Parameter(torch.tensor(w)), torch.nn.Dropout(p)

    def forward(self, x, sigma, class_labels=None):
        return self.drop(self.w * x)


def test_truncated_routes_rows_and_shares_the_tuned_masks():
    tuned, stage1 = _Scale(2.0), _Scale(3.0)
    D = Truncated(tuned, stage1, 1.0).train()
    x, sigma = torch.randn(6, 1, 2, 2), torch.tensor([5.0, 0.5, 1.0, 0.99, 2.0, 0.1])
    torch.manual_seed(0)
    out = D(x, sigma)
    torch.manual_seed(0)
    full = tuned(x, sigma)                                       # the tuned part alone, same RNG state
    high = sigma >= 1
    assert torch.equal(out[high], full[high])                    # its masks are those of a full-batch call
    assert torch.all((out[~high] == 0) | torch.isclose(out[~high], 6 * x[~high]))   # 3x, dropout p=0.5 (x2)
    out.sum().backward()
    assert tuned.w.grad is not None and stage1.w.grad is None and not stage1.w.requires_grad
    all_high = torch.full((6,), 2.0)
    torch.manual_seed(0)
    alone = D(x, all_high)
    torch.manual_seed(0)
    assert torch.equal(alone, tuned(x, all_high))                # no stage-1 rows: the tuned part itself


def test_dt_floor_stops_the_stages_at_tcms_ratio_limit():
    from ectune.schedules import ect_r
    t = torch.tensor([0.5, 1.0, 3.0, 80.0])
    n = 1 + 8 * torch.sigmoid(-t)
    assert torch.equal(ect_r(t, 3, dt_floor=0.0), (t * (1 - n / 2 ** 4)).clamp(min=0))      # ECT as it was
    assert torch.equal(ect_r(t, 3, dt_floor=1e-3), ect_r(t, 3))                              # above the floor
    torch.testing.assert_close((t - ect_r(t, 15, dt_floor=1e-3)) / t, n * 1e-3)              # at it


def test_tcm_draws_boundary_rows_and_weights_them():
    cfg = preset("tiny", "tune")
    cfg = replace(cfg, net=replace(cfg.net, truncate_t=1.0), loss=replace(cfg.loss, method="tcm", tcm_stage=3))
    lv = METHODS["tcm"].times(cfg, 16, 0, torch.Generator().manual_seed(1))
    boundary = lv.t == 1.0
    assert int(boundary.sum()) == 4 and bool((lv.t >= 1).all()) and bool((lv.r < lv.t).all())
    assert lv.info["stage"] == 3                                 # the stage it holds
    loss = torch.rand(16)
    want = loss[~boundary].mean() + 0.1 * loss[boundary].mean()
    torch.testing.assert_close((lv.weight * loss).mean(), want)


@pytest.fixture(scope="module")
def stage1(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("tcm")
    assert main(["tune", "--teacher", str(tiny_teacher / "teacher"), "--steps", "6", "--set", "net.dropout=0.1",
                 "--out", str(root / "ect"), "--no-progress"]) == 0
    (root / "teacher").symlink_to(tiny_teacher / "teacher")
    return root


def test_tcm_continues_a_stage1_run_and_resumes_exactly(stage1, tmp_path):
    args = ["tune", "--method", "tcm", "--teacher", str(stage1 / "ect"), "--no-progress", "--set", "log_every=1"]
    assert main([*args, "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "cut")]) == 0
    assert main([*args, "--steps", "4", "--out", str(tmp_path / "cut")]) == 0           # continued
    cfg, a, _ = read_weights(tmp_path / "straight")
    _, b, _ = read_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    e_cfg, ect, _ = read_weights(stage1 / "ect")
    last = 5 // e_cfg.stage_length                              # stage 1's last iteration (of 6)
    assert (cfg.net.truncate_t, cfg.loss.tcm_stage) == (1.0, last)
    assert cfg.optim.lr == e_cfg.optim.lr / 2 and cfg.kind == "tune" and cfg.loss.dt_floor == 1e-3
    stage1_now = {k[len("ema.stage1."):]: v for k, v in a.items() if k.startswith("ema.stage1.")}
    assert stage1_now and all(torch.equal(v, ect[f"ema.{k}"]) for k, v in stage1_now.items())   # frozen
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [last] * 4                                           # held
    assert main(["sample", "--ckpt", str(tmp_path / "straight"), "--steps", "2", "--n", "3",
                 "--out", str(tmp_path / "s.npz")]) == 0


def test_tcm_needs_a_stage1_consistency_model(stage1, tmp_path, capsys):
    assert main(["tune", "--method", "tcm", "--teacher", str(stage1 / "teacher"), "--steps", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "stage-1 tune run" in capsys.readouterr().err and not (tmp_path / "x").exists()
