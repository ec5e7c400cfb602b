"""Bad input through the CLI: a one-line error and exit code 2, nothing written, nothing lost.

Covers bad data (missing, empty, corrupt, mixed sizes or channels, the wrong shape for a teacher),
bad checkpoints (truncated, corrupt, of another architecture), bad configs and output folders, and
checkpoint writes that fail (disk full, read-only): the previous checkpoint survives and resumes.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ectune import checkpoint
from ectune.checkpoint import list_checkpoints, read_train_state, read_weights
from ectune.cli import main

FAST = ["--batch", "8", "--set", "sample.grid=4", "--set", "sample.heun_steps=2", "--no-progress"]



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 16x16 grayscale .npz and a finished 2-step tiny pretrain run on it (with its command)."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    np.savez(root / "gray16.npz", images=rng.integers(0, 256, (24, 16, 16), dtype=np.uint8))
    args = ["pretrain", "--preset", "tiny", "--data", str(root / "gray16.npz"), "--out", str(root / "run"),
            "--steps", "2", "--ckpt-every", "1", *FAST]
    assert main(args) == 0
    return root, args


def _fails(args: list[str], capsys, *expected: str) -> str:
    """Run the CLI; it must exit with 2 and one line on stderr that names each of `expected`."""
    assert main(args) == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("ectune: error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, err
    return err


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to check that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _resumable(base, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the base run and the command that continues it."""
    root, args = base
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    return run, [str(run) if a == str(root / "run") else a for a in args]


def _same(a, b) -> bool:
    """Exact equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _png(path: Path, size: int = 16, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


# --- data
def _corrupt_png(d: Path) -> None:
    _png(d / "a.png")
    (d / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))


def _truncated_png(d: Path) -> None:
    _png(d / "a.png")
    _png(d / "b.png")
    raw = (d / "b.png").read_bytes()
    (d / "b.png").write_bytes(raw[: len(raw) // 2])


def _mixed_sizes(d: Path) -> None:
    _png(d / "a.png", 16)
    _png(d / "b.png", 12)


def _mixed_channels(d: Path) -> None:
    _png(d / "a.png", 16, "L")
    _png(d / "b.png", 16, "RGB")


@pytest.mark.parametrize("make, expected", [
    (None, "does not exist"),                                   # a missing data folder
    (lambda d: d.mkdir(), "no .png"),                           # an empty one
    (_corrupt_png, "cannot read image"),
    (_truncated_png, "cannot read image"),
    (_mixed_sizes, "must share size and channels"),
    (_mixed_channels, "must share size and channels"),
], ids=["missing", "empty", "corrupt-image", "truncated-image", "mixed-sizes", "mixed-channels"])
def test_bad_data_folder(make, expected, tmp_path, capsys):
    data = tmp_path / "images"
    if make is not None:
        make(data)
    _fails(["pretrain", "--preset", "tiny", "--data", f"{data}/", "--out", str(tmp_path / "out"), *FAST],
           capsys, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_image(tmp_path, capsys):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "images" / "b.png")
    (tmp_path / "images" / "b.png").chmod(0)
    _fails(["pretrain", "--preset", "tiny", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
            *FAST], capsys, "cannot read image")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [(8, 12, 12), (8, 16, 16, 3)], ids=["resolution", "channels"])
def test_tune_data_of_another_shape_than_the_teacher(base, shape, tmp_path, capsys):
    root, _ = base
    np.savez(tmp_path / "other.npz", images=np.zeros(shape, dtype=np.uint8))
    _fails(["tune", "--teacher", str(root / "run"), "--data", str(tmp_path / "other.npz"),
            "--out", str(tmp_path / "out"), *FAST], capsys, "the teacher expects 1x16px")
    assert not (tmp_path / "out").exists()


# --- checkpoints
def test_truncated_teacher_weights(base, tmp_path, capsys):
    root, _ = base
    weights = tmp_path / "teacher.safetensors"
    raw = (list_checkpoints(root / "run")[-1] / "model.safetensors").read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    _fails(["tune", "--teacher", str(weights), "--out", str(tmp_path / "out"), *FAST], capsys, "cannot read weights")
    _fails(["sample", "--ckpt", str(weights), "--n", "2", "--out", str(tmp_path / "g.png")], capsys, "corrupt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "g.png").exists()


def _cut_weights(ckpt: Path) -> None:
    raw = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(raw[:-1000])


def _garbage_state(ckpt: Path) -> None:
    (ckpt / "train_state.pt").write_bytes(os.urandom(2000))


def _foreign_state(ckpt: Path) -> None:
    torch.save({"step": 2, "weights": torch.zeros(3)}, ckpt / "train_state.pt")


def _state_of_another_model(ckpt: Path) -> None:
    st = read_train_state(ckpt)
    st["optimizer"]["param_groups"][0]["params"] = [0]
    torch.save(st, ckpt / "train_state.pt")


def _weights_of_another_architecture(ckpt: Path) -> None:
    _, tensors, meta = read_weights(ckpt)
    save_file({k: v[..., :1].contiguous() if v.ndim == 4 else v for k, v in tensors.items()},
              ckpt / "model.safetensors", metadata=meta)


@pytest.mark.parametrize("damage, expected", [
    (_cut_weights, "cannot read weights"),
    (_garbage_state, "train_state.pt"),
    (_foreign_state, "train_state.pt"),
    (_state_of_another_model, "cannot resume"),
    (_weights_of_another_architecture, "does not match this architecture"),
], ids=["truncated-weights", "corrupt-train-state", "foreign-train-state", "state-of-another-model",
        "another-architecture"])
def test_damaged_latest_checkpoint_stops_the_resume_and_changes_nothing(base, damage, expected, tmp_path, capsys):
    run, args = _resumable(base, tmp_path)
    latest = list_checkpoints(run)[-1]
    damage(latest)
    before = _tree(run)
    _fails(args, capsys, expected, f"delete {latest}")
    assert _tree(run) == before
    shutil.rmtree(latest)                                      # what the message says: then it resumes
    assert main(args) == 0
    assert list_checkpoints(run)[-1].name == latest.name


def test_teacher_weights_whose_config_does_not_match_their_tensors(base, tmp_path, capsys):
    root, _ = base
    cfg, tensors, meta = read_weights(root / "run")
    wrong = cfg.to_json().replace('"model_channels": 16', '"model_channels": 32')
    assert wrong != cfg.to_json()
    save_file(tensors, tmp_path / "teacher.safetensors", metadata={**meta, "config": wrong})
    _fails(["tune", "--teacher", str(tmp_path / "teacher.safetensors"), "--out", str(tmp_path / "out"), *FAST],
           capsys, "does not match this architecture")
    _fails(["sample", "--ckpt", str(tmp_path / "teacher.safetensors"), "--n", "2", "--out", str(tmp_path / "g.png")],
           capsys, "does not match this architecture")
    assert not (tmp_path / "out").exists() and not (tmp_path / "g.png").exists()


# --- configs and output folders
@pytest.mark.parametrize("setting, expected", [
    ("loss.qq=3", "unknown config key"),
    ("batch=abc", "expects int"),
    ("optim.lr=nan", "expects float"),
    ("optim.betas=0.9", "expects 2 values"),
    ("ckpt_every=0", "ckpt_every must be >= 1"),
    ("ema.kind=box", "config ema must be"),
])
def test_bad_config_values(base, setting, expected, tmp_path, capsys):
    root, _ = base
    _fails(["pretrain", "--preset", "tiny", "--data", str(root / "gray16.npz"), "--out", str(tmp_path / "out"),
            "--set", setting, *FAST], capsys, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, expected", [
    (["--seed", "1"], "holds a different run (differs in ['seed'])"),
    (["--preset", "fmnist"], "holds a different run"),
], ids=["other-seed", "other-preset"])
def test_output_folder_of_a_different_run(base, change, expected, tmp_path, capsys):
    run, args = _resumable(base, tmp_path)
    before = _tree(run)
    _fails(args + change, capsys, expected)
    assert _tree(run) == before


def test_a_run_folder_in_use_is_refused_until_it_is_free(base, tmp_path, capsys):
    import fcntl
    run, args = _resumable(base, tmp_path)
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)                     # what a running `ectune` holds
    before = _tree(run)
    try:
        _fails(args, capsys, "is in use by another ectune process", "choose another --out")
        assert _tree(run) == before
    finally:
        os.close(fd)                                                    # that process ends (or is killed)
    assert main(args) == 0
    fd = os.open(run / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)                     # free again: the command let go at its end
    os.close(fd)


@pytest.mark.parametrize("make, expected", [
    (lambda out: out.write_text("not a folder"), "is not an ectune run folder"),
    (lambda out: (out.mkdir(), (out / "notes.txt").write_text("mine")), "is not an ectune run folder"),
    (lambda out: (out.mkdir(), (out / "config.json").write_bytes(b"\xff\xfe{")), "config.json is not a readable"),
], ids=["a-file", "a-foreign-folder", "unreadable-config"])
def test_output_folder_that_is_not_a_run(base, make, expected, tmp_path, capsys):
    root, _ = base
    out = tmp_path / "out"
    make(out)
    before = _tree(out) if out.is_dir() else out.read_bytes()
    _fails(["pretrain", "--preset", "tiny", "--data", str(root / "gray16.npz"), "--out", str(out), *FAST],
           capsys, expected, "choose another --out")
    assert (_tree(out) if out.is_dir() else out.read_bytes()) == before


# --- checkpoint writes that fail
def _disk_full_in_weights(monkeypatch):
    real = checkpoint.save_file

    def save(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:100])   # what got out before the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "save_file", save)


def _write_failure_in_train_state(monkeypatch):
    def save(obj, f, *args, **kwargs):                           # how torch.save reports a failed write
        f.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(checkpoint.torch, "save", save)


def _read_only_folder(monkeypatch):
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".tmp-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def _fail_from_call(monkeypatch, inject, first: int):
    """Let checkpoint writes 1 .. first-1 succeed, then break every later one with `inject`."""
    real, calls = checkpoint.save_checkpoint, []

    def save_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == first:
            inject(monkeypatch)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_checkpoint)


@pytest.mark.parametrize("inject, expected", [
    (_disk_full_in_weights, "No space left on device"),
    (_write_failure_in_train_state, "PytorchStreamWriter failed"),
    (_read_only_folder, "Read-only file system"),
], ids=["disk-full", "write-failed", "read-only"])
def test_failed_checkpoint_write_keeps_the_previous_one_and_resumes(base, inject, expected, tmp_path, monkeypatch,
                                                                      capsys):
    root, _ = base
    args = ["pretrain", "--preset", "tiny", "--data", str(root / "gray16.npz"), "--steps", "4", "--ckpt-every", "1",
            "--set", "log_every=1", *FAST]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    _fail_from_call(monkeypatch, inject, first=3)
    run = tmp_path / "run"
    _fails(args + ["--out", str(run)], capsys, expected, "cannot write checkpoint", "free disk space", str(run))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["00000001", "00000002"]   # no partial folder
    assert read_train_state(list_checkpoints(run)[-1])["step"] == 2
    monkeypatch.undo()
    assert main(args + ["--out", str(run)]) == 0
    a, b = (tmp_path / r / "checkpoints" / "00000004" for r in ("ref", "run"))
    assert _same(read_weights(a)[1], read_weights(b)[1]) and _same(read_train_state(a), read_train_state(b))
    ref_log, log = ((tmp_path / r / "log.jsonl").read_text().splitlines() for r in ("ref", "run"))
    assert [line.split('"img_per_s"')[0] for line in log] == [line.split('"img_per_s"')[0] for line in ref_log]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_really_read_only_checkpoint_folder(base, tmp_path, capsys):
    run, args = _resumable(base, tmp_path)
    args[args.index("--steps") + 1] = "3"
    (run / "checkpoints").chmod(0o555)
    try:
        _fails(args, capsys, "cannot write checkpoint", "check the permissions")
        assert [p.name for p in list_checkpoints(run)] == ["00000001", "00000002"]
    finally:
        (run / "checkpoints").chmod(0o755)
    assert main(args) == 0


def test_resume_never_refuses_an_existing_run(base, capsys):
    """--resume auto (the default) continues a run folder; --resume never refuses it and writes nothing."""
    root, args = base
    before = _tree(root / "run")
    _fails(args + ["--resume", "never"], capsys, "--resume never")
    assert _tree(root / "run") == before
