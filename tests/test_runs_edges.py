"""Run folders at their edges: the data a run was made with, refused resumes that change nothing,
failed first starts that leave nothing, complete runs, damaged checkpoints, searched mid times kept
beside the weights, and file modes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ectune.checkpoint import list_checkpoints
from ectune.cli import main
from ectune.errors import EctuneError
from test_bad_input import _fails, _tree  # the same one-line-error and folder-bytes checks

FAST = ["--batch", "8", "--set", "sample.grid=4", "--set", "sample.heun_steps=2", "--no-progress"]


def _npz(path: Path, seed: int, n: int = 24, size: int = 16) -> str:
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, size, size), dtype=np.uint8), labels=rng.integers(0, 3, n))
    return str(path)


def _args(data: str, out: Path, steps: int = 2, *extra: str) -> list[str]:
    return ["pretrain", "--preset", "tiny", "--data", data, "--out", str(out), "--steps", str(steps),
            "--ckpt-every", "1", *FAST, *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Three datasets (a, b: same size, other pixels; c: larger) and a finished 2-step run on a."""
    root = tmp_path_factory.mktemp("runs_edges")
    data = {"a": _npz(root / "a.npz", 0), "b": _npz(root / "b.npz", 1), "c": _npz(root / "c.npz", 0, n=32)}
    assert main(_args(data["a"], root / "run")) == 0
    return root, data


@pytest.fixture
def run(base, tmp_path):
    root, _ = base
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run"


# 1. the data a run was made with
def test_other_data_of_the_same_size_is_refused_naming_both(base, run, capsys):
    _, data = base
    fp = json.loads((run / "data.json").read_text())
    assert fp["n"] == 24 and fp["shape"] == [1, 16, 16] and fp["classes"] == 3 and len(fp["sha256"]) == 64
    before = _tree(run)
    err = _fails(_args(data["b"], run, 3), capsys, data["a"], data["b"], fp["sha256"][:12],
                 "pass the original --data", "a new --out")
    assert err.count("sha256") == 2
    assert _tree(run) == before                                     # config.json byte-identical too
    assert main(_args(data["a"], run, 3)) == 0


def test_same_data_under_another_path_resumes(base, run, tmp_path):
    _, data = base
    moved = shutil.copy(data["a"], tmp_path / "moved.npz")
    assert main(_args(str(moved), run, 3)) == 0
    assert list_checkpoints(run)[-1].name == "00000003"


def test_a_run_without_fingerprint_resumes_and_records_it(base, run, capsys):
    _, data = base
    fp = (run / "data.json").read_bytes()
    (run / "data.json").unlink()                                    # a run made before fingerprints
    assert main(_args(data["a"], run, 3)) == 0
    assert json.loads((run / "data.json").read_bytes())["sha256"] == json.loads(fp)["sha256"]
    capsys.readouterr()
    (run / "data.json").unlink()
    _fails(_args(data["c"], run, 4), capsys, "trained on 24 images but the data has 32",
           f"pass the original --data {data['a']}")


def test_a_tune_run_refuses_other_data_too(base, run, tmp_path, capsys):
    _, data = base
    args = ["tune", "--teacher", str(run), "--out", str(tmp_path / "ect"), "--steps", "1", *FAST]
    assert main(args) == 0
    before = _tree(tmp_path / "ect")
    _fails(args[:-len(FAST)] + ["--steps", "2", "--data", data["b"], *FAST], capsys, data["a"], data["b"])
    assert _tree(tmp_path / "ect") == before


# 2. no advice that loses work; no silent restart
def test_other_size_data_gives_no_delete_advice_and_nothing_restarts(base, run, capsys):
    _, data = base
    (run / "data.json").unlink()
    before = _tree(run)
    err = _fails(_args(data["c"], run, 3), capsys, "pass the original --data")
    assert "delete" not in err and _tree(run) == before
    log = (run / "log.jsonl").read_bytes()
    for ckpt in list_checkpoints(run):                               # what the old advice led to
        shutil.rmtree(ckpt)
    _fails(_args(data["a"], run, 3), capsys, "checkpoints were removed", f"remove {run}", "another --out")
    assert (run / "log.jsonl").read_bytes() == log and not list_checkpoints(run)


def test_resume_never_says_how_to_start_over(base, run, capsys):
    _, data = base
    _fails(_args(data["a"], run, 2, "--resume", "never"), capsys, "--resume never", f"remove {run}", "another --out")


# 3. failed first starts leave nothing behind
@pytest.mark.parametrize("extra, expected", [
    (["--set", "optim.name=foo"], "unknown optimizer"),
    (["--set", "engine.precision=foo"], "unknown engine.precision"),
    (["--set", "engine.precision=fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["--set", "loss.method=nope"], "loss.method"),
], ids=["optimizer", "precision", "fp16-on-cpu", "loss-method"])
def test_bad_config_creates_nothing_and_the_fixed_command_runs(base, extra, expected, tmp_path, capsys):
    _, data = base
    out = tmp_path / "new"
    _fails(_args(data["a"], out, 1, *extra), capsys, expected)
    assert not out.exists()
    assert main(_args(data["a"], out, 1)) == 0


def test_odd_resolution_creates_nothing(tmp_path, capsys):
    odd = _npz(tmp_path / "odd.npz", 0, size=15)
    out = tmp_path / "new"
    _fails(_args(odd, out, 1), capsys, "img_resolution=15")
    assert not out.exists()
    out.mkdir()                                                      # an empty folder stays, empty
    _fails(_args(odd, out, 1), capsys, "img_resolution=15")
    assert out.is_dir() and not any(out.iterdir())
    assert main(_args(_npz(tmp_path / "even.npz", 0), out, 1)) == 0


def test_failure_during_a_first_start_removes_what_it_made(base, tmp_path, capsys, monkeypatch):
    from ectune import training
    _, data = base

    def broken(*args, **kwargs):
        raise EctuneError("injected failure before training")
    monkeypatch.setattr(training, "wrap_model", broken)
    out = tmp_path / "new"
    _fails(_args(data["a"], out, 1), capsys, "injected failure")
    assert not out.exists()
    monkeypatch.undo()
    assert main(_args(data["a"], out, 1)) == 0


# 4. refused resumes, complete runs, --ckpt forms, damaged checkpoints
def test_complete_run_says_so_and_changes_nothing(base, run, capsys):
    _, data = base
    capsys.readouterr()
    before = _tree(run)
    assert main(_args(data["a"], run, 2)) == 0
    out = capsys.readouterr().out
    assert f"run {run} is complete: 2/2 steps; nothing to do; pass a larger --steps" in out and "done" not in out
    assert _tree(run) == before
    assert main(_args(data["a"], run, 3)) == 0
    assert f"resuming {run} from step 2/3" in capsys.readouterr().out


def test_refused_resume_on_a_damaged_checkpoint_leaves_config_and_names_the_intact_one(base, run, capsys):
    _, data = base
    first, latest = list_checkpoints(run)
    (latest / "model.safetensors").unlink()                          # damaged: used to be skipped silently
    before = _tree(run)
    _fails(_args(data["a"], run, 3), capsys, f"delete {latest}", f"before it ({first})")
    assert _tree(run) == before


def test_only_checkpoint_damaged_says_how_to_start_over(base, run, capsys):
    _, data = base
    first, latest = list_checkpoints(run)
    shutil.rmtree(first)
    raw = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    err = _fails(_args(data["a"], run, 3), capsys, "only checkpoint", f"remove {run}")
    assert "delete" not in err


def test_ckpt_accepts_the_checkpoints_folder_and_warns_of_a_damaged_latest(run, tmp_path, capsys):
    first, latest = list_checkpoints(run)
    assert main(["sample", "--ckpt", str(run / "checkpoints"), "--n", "2", "--sampler", "heun", "--num-steps", "2",
                 "--out", str(tmp_path / "a.npz")]) == 0
    raw = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--sampler", "heun", "--num-steps", "2",
                 "--out", str(tmp_path / "b.npz")]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {latest} is damaged" in err and f"using the intact {first}" in err, err


# 5. searched mid times beside the weights
@pytest.fixture
def weights(tmp_path):
    from ectune.demo import shipped_teacher
    f = tmp_path / "ckpt" / "model.safetensors"
    f.parent.mkdir()
    shutil.copy(shipped_teacher(), f)
    return f


def test_search_keeps_the_weights_byte_identical_and_sample_uses_the_sidecar(weights, tmp_path):
    from ectune.checkpoint import read_weights
    from ectune.midtime import stored_mid_times
    raw = weights.read_bytes()
    out = tmp_path / "r.json"
    assert main(["eval", "--ckpt", str(weights.parent), "--sampler", "consistency", "--steps", "2", "--search-mid-t",
                 "--candidates", "0.5", "3.0", "--search-n", "8", "--n", "8", "--out", str(out)]) == 0
    best = json.loads(out.read_text())["mid_t_search"]["mid_ts"]
    assert weights.read_bytes() == raw
    assert json.loads((weights.parent / "mid_times.json").read_text()) == {"2": best}
    assert stored_mid_times(weights, 2) == best and read_weights(weights)[0].sample.mid_ts == tuple(best)
    assert main(["sample", "--ckpt", str(weights), "--steps", "2", "--n", "2", "--out", str(tmp_path / "s.npz")]) == 0


def test_mid_times_in_old_metadata_are_still_read(weights):
    from safetensors.torch import load_file, safe_open, save_file

    from ectune.midtime import store_mid_times, stored_mid_times
    with safe_open(str(weights), framework="pt") as h:
        meta = h.metadata()
    save_file(load_file(str(weights)), weights, metadata={**meta, "mid_ts_by_steps": json.dumps({"2": [1.5]})})
    assert stored_mid_times(weights, 2) == [1.5] and stored_mid_times(weights, 3) is None
    store_mid_times(weights, [3.0, 0.7])                                # the sidecar adds; the old entry stays
    assert stored_mid_times(weights, 2) == [1.5] and stored_mid_times(weights, 3) == [3.0, 0.7]


@pytest.mark.parametrize("text", ["{not json", '{"2": [1.0, 2.0]}', '["x"]'])
def test_a_corrupt_sidecar_is_an_error_naming_it(weights, text):
    from ectune.midtime import stored_mid_times
    side = weights.parent / "mid_times.json"
    side.write_text(text)
    with pytest.raises(EctuneError, match="mid_times.json"):
        stored_mid_times(weights, 2)


# 6. file modes
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_files_get_the_usual_mode(base, umask, mode, tmp_path):
    _, data = base
    old = os.umask(umask)
    try:
        assert main(_args(data["a"], tmp_path / "r", 1)) == 0
    finally:
        os.umask(old)
    ckpt = list_checkpoints(tmp_path / "r")[-1]
    assert {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()} == {"model.safetensors": mode,
                                                                         "train_state.pt": mode}
