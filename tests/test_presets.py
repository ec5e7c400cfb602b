"""The paper's recipes as presets (ECT.md §4 and §7)."""

import pytest
import torch

from ectune.presets import preset, preset_names
from ectune.schedules import ect_r


def test_cifar10_is_the_papers_recipe():
    c = preset("cifar10", "tune")
    assert (c.batch, c.steps, c.loss.q, c.loss.stage_iters, c.net.dropout) == (128, 200000, 2.0, 25000, 0.2)
    assert (c.optim.name, c.optim.lr, c.optim.betas, c.ema.kind, c.ema.beta) == ("radam", 1e-4, (0.9, 0.999), "fixed", 0.9999)
    assert (c.loss.P_mean, c.loss.P_std, c.loss.weighting, c.sample.mid_ts) == (-1.1, 2.0, "inv_dt", (0.821,))
    assert c.stage_length * 8 == c.steps
    for kind in ("tune", "pretrain"):             # the official code's --fp16 False --tf32 False
        for name in ("cifar10", "cifar10-fast"):
            e = preset(name, kind).engine
            assert (e.precision, e.tf32) == ("fp32", False)
    assert preset("fmnist", "tune").engine.precision == "auto"        # elsewhere the default stays


def test_cifar10_fast_uses_q256_from_the_first_iteration():
    c = preset("cifar10-fast", "tune")
    assert c.ema.beta == 0.9993 and c.stage_length >= c.steps            # one stage for the whole run
    t = torch.tensor([0.5, 2.0, 10.0])
    n = 1 + 8 * torch.sigmoid(-t)
    torch.testing.assert_close(ect_r(t, 0, q=c.loss.q), t * (1 - n / 256))


def test_imagenet64_settings():
    c = preset("imagenet64", "tune")
    assert (c.loss.P_mean, c.loss.P_std, c.loss.q, c.loss.c, c.loss.weighting) == (-0.8, 1.6, 4.0, 0.06, "snr")
    assert (c.optim.name, c.optim.lr, c.optim.betas, c.optim.lr_ref_steps) == ("adam", 1e-3, (0.9, 0.99), 2000)
    assert (c.steps, c.stage_length, c.net.label_dim, c.net.img_resolution) == (100000, 25000, 1000, 64)
    assert c.sample.mid_ts == (1.526,)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_json(name):
    import json
    from ectune.config import RunConfig
    for kind in ("pretrain", "tune"):
        cfg = preset(name, kind)
        assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
