"""Mid-time search for k-step consistency sampling (ECT.md §5) and storing the result."""

import json
import shutil

import pytest
import torch

from ectune.checkpoint import read_weights
from ectune.errors import EctuneError
from ectune.midtime import candidate_grid, search_mid_times, store_mid_times


def _spread_error(s=0.5):
    """With the exact Gaussian denoiser, 2-step samples have std s²·t1/(s² + t1²) (mu aside): largest,
    s/2, at t1 = s. This score is lowest there, so the search must pick the candidate nearest s."""
    return lambda x: abs(x.std().item() - s / 2)


def test_two_step_search_finds_the_known_optimum(gaussian_denoiser):
    best, tried = search_mid_times(gaussian_denoiser, (1, 8, 8), _spread_error(),
                                   candidates=[0.1, 0.25, 0.5, 1.0, 2.0, 4.0], seeds=range(200))
    assert best == [0.5]
    assert len(tried) == 6 and min(tried, key=lambda r: r["score"])["mid_ts"] == [0.5]


def test_k_step_search_keeps_times_decreasing(gaussian_denoiser):
    best, _ = search_mid_times(gaussian_denoiser, (1, 4, 4), _spread_error(), steps=4,
                               candidates=candidate_grid(0.1, 10, 7), seeds=range(50))
    assert len(best) == 3 and all(a > b for a, b in zip([80.0, *best], best))


def test_bad_search_requests(gaussian_denoiser):
    with pytest.raises(EctuneError):
        search_mid_times(gaussian_denoiser, (1, 4, 4), _spread_error(), steps=1)
    with pytest.raises(EctuneError):
        search_mid_times(gaussian_denoiser, (1, 4, 4), _spread_error(), candidates=[100.0])


def test_store_changes_only_the_configs_mid_times(tmp_path):
    from ectune.demo import shipped_teacher
    f = tmp_path / "m.safetensors"
    shutil.copy(shipped_teacher(), f)
    cfg0, t0, meta0 = read_weights(f)
    store_mid_times(f, [1.234])
    cfg1, t1, meta1 = read_weights(f)
    assert cfg1.sample.mid_ts == (1.234,) and cfg1.sample.t_max == cfg0.sample.t_max
    assert cfg1.net == cfg0.net and cfg1.loss == cfg0.loss
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    assert {k for k in meta0 if k != "config"} <= set(meta1)
    assert json.loads(meta1["mid_ts_by_steps"]) == {"2": [1.234]}


def test_a_three_step_search_keeps_the_two_step_times(tmp_path):
    from ectune.demo import shipped_teacher
    from ectune.midtime import stored_mid_times
    f = tmp_path / "m.safetensors"
    shutil.copy(shipped_teacher(), f)
    assert stored_mid_times(f, 2) is None
    store_mid_times(f, [1.5])
    store_mid_times(f, [3.0, 0.7])
    assert stored_mid_times(f, 2) == [1.5] and stored_mid_times(f, 3) == [3.0, 0.7]
    assert read_weights(f)[0].sample.mid_ts == (1.5,)                 # the config keeps the 2-step times


def test_cli_eval_search_stores_and_sample_uses_it(tmp_path, capsys):
    from ectune.cli import main
    from ectune.demo import shipped_teacher
    from ectune.models import load_denoiser
    from ectune.sampling import Sampler, sample_images
    f = tmp_path / "m.safetensors"
    shutil.copy(shipped_teacher(), f)                          # any denoiser works for the mechanics
    out = tmp_path / "r.json"
    assert main(["eval", "--ckpt", str(f), "--sampler", "consistency", "--steps", "2", "--search-mid-t",
                 "--candidates", "0.5", "3.0", "--search-n", "16", "--n", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    best = result["mid_t_search"]["mid_ts"]
    assert best[0] in (0.5, 3.0) and result["sampler"]["ts"] == [80.0, *best]
    assert result["mid_t_search"]["heldout_seeds"][0] >= 1_000_000 > result["seeds"][1]
    assert read_weights(f)[0].sample.mid_ts == tuple(best)
    assert main(["sample", "--ckpt", str(f), "--sampler", "consistency", "--steps", "2", "--n", "3",
                 "--out", str(tmp_path / "s.npz")]) == 0
    import numpy as np
    D, _ = load_denoiser(f)
    want = sample_images(D, [0, 1, 2], (1, 28, 28), Sampler.consistency([80.0, *best]))
    got = np.load(tmp_path / "s.npz")["images"]
    from ectune.images import to_uint8
    assert np.array_equal(got, to_uint8(want))


def test_eval_and_search_on_a_class_conditional_model(tmp_path):
    """Conditional models get labels seed % classes in eval and in the held-out search."""
    import numpy as np
    from ectune.cli import main
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (24, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 3, 24))
    assert main(["pretrain", "--preset", "tiny", "--cond", "--data", str(tmp_path / "d.npz"), "--steps", "2",
                 "--set", "sample.grid=4", "--set", "sample.heun_steps=2", "--out", str(tmp_path / "t"),
                 "--no-progress"]) == 0
    out = tmp_path / "r.json"
    assert main(["eval", "--ckpt", str(tmp_path / "t"), "--sampler", "consistency", "--steps", "2",
                 "--search-mid-t", "--candidates", "0.5", "2.0", "--search-n", "8", "--n", "8",
                 "--ref-data", "fashion-mnist", "--out", str(out)]) == 0   # random data: score vs FMNIST explicitly
    assert json.loads(out.read_text())["mid_t_search"]["mid_ts"][0] in (0.5, 2.0)


def test_update_mid_times_adds_one_entry_atomically_and_leaves_the_weights(tmp_path):
    from ectune.checkpoint import mid_times_file, read_mid_times, update_mid_times
    from ectune.demo import shipped_teacher
    f = tmp_path / "model.safetensors"
    shutil.copy(shipped_teacher(), f)
    raw = f.read_bytes()
    assert update_mid_times(f, [2.0]) == mid_times_file(f) == tmp_path / "mid_times.json"
    update_mid_times(f, [3.0, 0.5])
    update_mid_times(f, [1.0])                                         # replaces the 2-step entry only
    assert read_mid_times(f) == {"2": [1.0], "3": [3.0, 0.5]} and f.read_bytes() == raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid_times.json", "model.safetensors"]   # no temporaries


def test_a_note_for_a_flag_the_default_sampler_does_not_use(tmp_path, capsys):
    from ectune.cli import main
    from ectune.demo import shipped_teacher                            # a pretrain model: heun by default
    assert main(["sample", "--ckpt", str(shipped_teacher()), "--steps", "2", "--num-steps", "2", "--n", "1",
                 "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "ectune: note: --steps is not used by the heun sampler" in err and "--sampler consistency" in err
