"""CTM's γ-sampling for consistency models (`--gamma`, `sample.gamma`): the formula at γ = 1 (Song et
al.'s sampler, exactly), 0 (deterministic) and between, the flags and configs that carry it, and the
joint (mid time, γ) search."""

import math

import numpy as np
import pytest
import torch

from ectune.cli import main
from ectune.errors import EctuneError
from ectune.midtime import search_mid_and_gamma, search_mid_times
from ectune.sampling import Sampler, sample_consistency


def toy(x, sigma, class_labels=None):
    s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
    return 0.3 + x / (1 + s)


def test_gamma_one_is_song_et_als_sampler_and_zero_is_deterministic():
    z, e = torch.randn(2, 5, 1, 3, 3, dtype=torch.float64)
    T, mid = 80.0, 2.5
    sig = [T, mid, 0.0]
    x0 = toy(z * T, torch.full((5,), T))
    song = toy(x0 + mid * e, torch.full((5,), mid)).float()
    assert torch.equal(sample_consistency(toy, z * T, sig, step_noise=[e]), song)
    assert torch.equal(sample_consistency(toy, z * T, sig, step_noise=[e], gamma=1.0), song)
    ddim = toy(x0 + mid * (z * T - x0) / T, torch.full((5,), mid)).float()
    got = sample_consistency(toy, z * T, sig, step_noise=[e], gamma=0.0)
    assert torch.allclose(got, ddim, atol=1e-6)
    assert torch.equal(got, sample_consistency(toy, z * T, sig, step_noise=[torch.randn_like(e)], gamma=0.0))
    g = 0.6
    mixed = toy(x0 + mid * (math.sqrt(1 - g * g) * (z * T - x0) / T + g * e), torch.full((5,), mid)).float()
    assert torch.allclose(sample_consistency(toy, z * T, sig, step_noise=[e], gamma=g), mixed, atol=1e-6)


def test_the_sampler_carries_gamma_and_refuses_what_it_cannot_use():
    s = Sampler.consistency([80.0, 2.0], gamma=0.7)
    assert s.gamma == 0.7 and s.spec == {"name": "consistency", "ts": [80.0, 2.0], "nfe": 2, "gamma": 0.7}
    assert "gamma=0.7" in s.label
    assert Sampler.consistency([80.0, 2.0]).spec == {"name": "consistency", "ts": [80.0, 2.0], "nfe": 2}
    assert Sampler.consistency([80.0], gamma=0.3).spec == Sampler.consistency([80.0]).spec     # 1 step: no γ
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(EctuneError, match="gamma"):
            Sampler.consistency([80.0, 2.0], gamma=bad)
    with pytest.raises(EctuneError, match="gamma .* belongs to consistency sampling"):
        Sampler("heun", (80.0, 1.0, 0.0), 0.5)


def test_the_joint_search_returns_its_best_row():
    seeds = list(range(1_000_000, 1_000_040))

    def score(x):
        return float((x.std() - 0.4).abs())
    cands = [0.5, 1.0, 2.0, 4.0]
    mid, gamma, tried = search_mid_and_gamma(toy, (1, 4, 4), score, candidates=cands, seeds=seeds, batch=16)
    at = [r for r in tried if r.get("gamma", 1.0) == gamma and r["mid_ts"] == mid]
    assert at and at[0]["score"] == min(r["score"] for r in tried)
    only, _ = search_mid_times(toy, (1, 4, 4), score, candidates=cands, seeds=seeds, batch=16)
    assert search_mid_and_gamma(toy, (1, 4, 4), score, gammas=(1.0,), candidates=cands, seeds=seeds,
                                batch=16)[:2] == (only, 1.0)


def _table_search(monkeypatch, table: dict, gammas=(1.0, 0.5, 0.0)):
    """The joint search on a score table {(γ, mid): score}: each 'sample' carries its (mid, γ)."""
    import ectune.midtime as midtime
    drawn = []

    def fake_sample(D, seeds, shape, sampler, **kw):
        drawn.append((sampler.gamma, sampler.ts[1]))
        return torch.tensor([sampler.ts[1], sampler.gamma])
    monkeypatch.setattr(midtime, "sample_images", fake_sample)
    score = lambda x: table.get((float(x[1]), float(x[0])), 100.0)
    mid, gamma, tried = search_mid_and_gamma(None, (1, 4, 4), score, gammas=gammas, candidates=[0.5, 1.0, 4.0],
                                             seeds=[0])
    assert len(drawn) == len(set(drawn)) == len(tried)                  # each (γ, mid) sampled once
    assert min(tried, key=lambda r: r["score"]) == {"mid_ts": mid, "score": table[gamma, mid[0]],
                                                    **({"gamma": gamma} if gamma != 1 else {})}
    return mid, gamma


def test_the_joint_search_scans_both_ends_of_gamma(monkeypatch):
    """γ 1's best mid time (0.5) is a poor one for γ 0, whose own best (4.0) beats everything: a search
    from γ 1 alone would stop at (0.5, 1), as the one before this did at 384k tuning images."""
    table = {(1.0, 0.5): 50.0, (1.0, 1.0): 60.0, (0.5, 0.5): 70.0, (0.0, 0.5): 90.0, (0.0, 4.0): 30.0}
    assert _table_search(monkeypatch, table) == ([4.0], 0.0)
    # a γ between the ends that beats both at the better end's mid time gets its own scan
    table = {(1.0, 0.5): 50.0, (0.0, 4.0): 40.0, (0.5, 4.0): 35.0, (0.5, 1.0): 20.0}
    assert _table_search(monkeypatch, table) == ([1.0], 0.5)
    assert _table_search(monkeypatch, {(1.0, 1.0): 10.0, (0.0, 4.0): 40.0}) == ([1.0], 1.0)
    assert _table_search(monkeypatch, {(1.0, 1.0): 10.0}, gammas=(1.0,)) == ([1.0], 1.0)


def test_known_scores_are_not_sampled_again(monkeypatch):
    from ectune.midtime import known_scores
    import ectune.midtime as midtime
    table = {(1.0, 0.5): 50.0, (0.0, 4.0): 30.0}
    first = search_mid_and_gamma(None, (1,), lambda x: 1.0, candidates=[0.5, 4.0], seeds=[0], gammas=(1.0, 0.0),
                                 known={(g, (m,)): table.get((g, m), 100.0) for g in (1.0, 0.0) for m in (0.5, 4.0)})
    monkeypatch.setattr(midtime, "sample_images", lambda *a, **k: pytest.fail("a known score was sampled again"))
    again = search_mid_and_gamma(None, (1,), lambda x: 1.0, candidates=[0.5, 4.0], seeds=[0], gammas=(1.0, 0.0),
                                 known=known_scores(first[2]))
    assert first == again and first[:2] == ([4.0], 0.0)


def test_gamma_through_the_cli(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", images=np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8))
    assert main(["pretrain", "--preset", "tiny", "--data", str(tmp_path / "d.npz"), "--steps", "1",
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert main(["tune", "--teacher", str(tmp_path / "t"), "--steps", "1", "--out", str(tmp_path / "e"),
                 "--set", "sample.gamma=0.5", "--no-progress"]) == 0
    common = ["--ckpt", str(tmp_path / "e"), "--n", "4", "--no-progress"]
    assert main(["sample", *common, "--steps", "2", "--out", str(tmp_path / "run.npz")]) == 0
    assert main(["sample", *common, "--steps", "2", "--gamma", "0.5", "--out", str(tmp_path / "flag.npz")]) == 0
    assert main(["sample", *common, "--steps", "2", "--gamma", "1", "--out", str(tmp_path / "one.npz")]) == 0
    run, flag, one = (np.load(tmp_path / f"{n}.npz")["images"] for n in ("run", "flag", "one"))
    assert np.array_equal(run, flag) and not np.array_equal(run, one)       # the run's sample.gamma is the default
    capsys.readouterr()
    assert main(["sample", *common, "--gamma", "1.5", "--out", str(tmp_path / "x.npz")]) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err
    assert main(["sample", *common, "--sampler", "heun", "--gamma", "0.5", "--out", str(tmp_path / "x.npz")]) == 2
    assert "--gamma is not used by the heun sampler" in capsys.readouterr().err
    assert main(["tune", "--teacher", str(tmp_path / "t"), "--steps", "1", "--out", str(tmp_path / "bad"),
                 "--set", "sample.gamma=-1", "--no-progress"]) == 2
    assert "sample.gamma must be in [0, 1]" in capsys.readouterr().err and not (tmp_path / "bad").exists()



def test_mid_times_are_stored_per_gamma(tmp_path):
    """A search at γ = 0.5 is kept beside the γ = 1 one; sampling reads the entry of its own γ, and the
    weights' config folds in the entry of its sample.gamma."""
    import json
    import shutil
    from dataclasses import replace

    from ectune.checkpoint import read_weights
    from ectune.demo import shipped_teacher
    from ectune.generation import choose_sampler
    from ectune.midtime import store_mid_times, stored_mid_times
    f = tmp_path / "m.safetensors"
    shutil.copy(shipped_teacher(), f)
    store_mid_times(f, [2.0])
    store_mid_times(f, [3.0], 0.5)
    assert stored_mid_times(f, 2) == [2.0] and stored_mid_times(f, 2, 0.5) == [3.0]
    assert stored_mid_times(f, 2, 0.0) is None
    assert json.loads((tmp_path / "m.mid_times.json").read_text()) == {"2": [2.0], "2@gamma0.5": [3.0]}
    cfg = read_weights(f)[0]
    assert cfg.sample.gamma == 1 and cfg.sample.mid_ts == (2.0,)         # the config folds in its own γ's entry
    tuned = replace(cfg, loss=replace(cfg.loss, method="ect"), sample=replace(cfg.sample, gamma=0.5))
    assert choose_sampler(tuned, f, steps=2).ts == [80.0, 3.0] and choose_sampler(tuned, f, steps=2).gamma == 0.5
    assert choose_sampler(tuned, f, steps=2, gamma=1.0).ts == [80.0, 2.0]
    (tmp_path / "m.mid_times.json").write_text('{"2@gammaX": [1.0]}')
    with pytest.raises(EctuneError, match="corrupt"):
        stored_mid_times(f, 2)


def test_eval_searches_mid_time_and_gamma_together(tmp_path, capsys):
    """`ectune eval --search-gamma`: the joint search's best row is the one evaluated and stored under its
    γ, and `ectune sample --gamma γ` then samples exactly at that mid time."""
    import json
    import shutil

    from ectune.demo import shipped_teacher
    from ectune.midtime import stored_mid_times
    f = tmp_path / "m.safetensors"
    shutil.copy(shipped_teacher(), f)                          # any denoiser works for the mechanics
    out = tmp_path / "r.json"
    common = ["--ckpt", str(f), "--sampler", "consistency", "--no-progress"]
    assert main(["eval", *common, "--steps", "2", "--search-gamma", "0", "--candidates", "0.5", "3.0",
                 "--search-n", "8", "--n", "8", "--out", str(out)]) == 0
    found = json.loads(out.read_text())
    search = found["mid_t_search"]
    mid, gamma = search["mid_ts"], search["gamma"]
    assert gamma in (0.0, 1.0) and mid[0] in (0.5, 3.0)
    best = min(search["tried"], key=lambda r: r["score"])
    assert (best["mid_ts"], best.get("gamma", 1.0)) == (mid, gamma)
    assert {r.get("gamma", 1.0) for r in search["tried"]} == {0.0, 1.0}
    assert found["sampler"]["ts"] == [80.0, *mid] and found["sampler"].get("gamma", 1.0) == gamma
    assert stored_mid_times(f, 2, gamma) == mid
    assert f"at γ {gamma:g}" in capsys.readouterr().out
    assert main(["sample", *common, "--steps", "2", "--gamma", f"{gamma:g}", "--n", "3",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert main(["sample", *common, "--ts", "80", str(mid[0]), "--gamma", f"{gamma:g}", "--n", "3",
                 "--out", str(tmp_path / "ts.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "s.npz")["images"], np.load(tmp_path / "ts.npz")["images"])
    for bad, says in ((["--steps", "2", "--search-gamma", "--gamma", "0"], "drop --gamma"),
                      (["--steps", "3", "--search-gamma"], "with --steps 2"),
                      (["--steps", "2", "--search-gamma", "1.5"], "in [0, 1]")):
        capsys.readouterr()
        assert main(["eval", *common, *bad, "--n", "4", "--out", str(tmp_path / "x.json")]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / "x.json").exists()
