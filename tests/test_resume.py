"""Crash-safe exact resume: runs killed with SIGKILL at random moments (and during checkpoint writes),
or stopped by SIGTERM / SIGINT, continue when the same command is run again and end bit-identical to
an uninterrupted run on the CPU.

The runs are child processes of one driver process (this file run as a script): the driver imports
torch once and forks a child per attempt, which runs `python -m ectune.cli ARGS` through runpy. The
driver sends SIGKILL when a child has used a CPU time drawn from a seeded RNG (random moments,
anywhere, also inside C code; CPU time rather than wall time so that a busy machine moves them
little), or the child kills itself halfway through writing a checkpoint file, or right before a
finished temporary checkpoint folder is renamed into place. After every kill or stop the driver
copies the run folder, so the tests can check that what a crash leaves behind loads.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

STEPS = 6



def _pretrain_args(data: str, out: str) -> list[str]:
    return ["pretrain", "--preset", "tiny", "--data", data, "--out", out, "--steps", str(STEPS), "--batch", "8",
            "--ckpt-every", "1", "--set", "net.dropout=0.2", "--set", "log_every=1", "--set", "sample_every=1000",
            "--set", "sample.grid=4", "--set", "sample.heun_steps=2", "--no-progress"]


def _tune_args(teacher: str, out: str) -> list[str]:
    return ["tune", "--teacher", teacher, "--out", out, "--steps", str(STEPS), "--batch", "8", "--ckpt-every", "1",
            "--set", "net.dropout=0.2", "--set", "log_every=1", "--set", "sample_every=1000",
            "--set", "sample.grid=4", "--no-progress"]


# --- the driver (runs in its own process; no torch computation happens in it, only in its children)
def _child(argv: list[str], kill: dict | None, logs: Path) -> None:
    """Run `python -m ectune.cli *argv` in this forked process, arming the kill of the plan; never returns."""
    import runpy

    from ectune import checkpoint
    from ectune.data import BatchSampler
    from ectune.ema import EMA

    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(logs.with_suffix("." + name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    kill = kill or {}
    counts = {"events": 0, "start": None}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill.get("type") == "count":
        real_next = BatchSampler.next_batch

        def next_batch(self):                     # CPU seconds of start-up: until the first batch
            if counts["start"] is None:
                counts["start"] = time.process_time()
            return real_next(self)

        BatchSampler.next_batch = next_batch
    elif kill.get("type") == "before_rename":     # the temporary folder is complete and fsynced
        real_publish = checkpoint._publish

        def publish(tmp, final):
            counts["events"] += 1
            if counts["events"] == kill["nth"]:
                die()
            real_publish(tmp, final)

        checkpoint._publish = publish
    elif kill.get("type") == "torn_write":        # killed halfway through writing train_state.pt
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            counts["events"] += 1
            if counts["events"] != kill["nth"]:
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            with open(f, "r+b") if isinstance(f, (str, Path)) else contextlib.nullcontext(f) as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                out.flush()
            die()

        torch.save = save
    elif kill.get("type") == "signal":            # a real signal, delivered during EMA update number `at`
        real_update = EMA.update

        def update(self, net, step):
            real_update(self, net, step)
            counts["events"] += 1
            if counts["events"] == kill["at"]:
                logs.with_suffix(".signal").write_text(str(step))
                os.kill(os.getpid(), getattr(signal, kill["sig"]))

        EMA.update = update
    code = 1
    try:
        sys.argv = ["ectune", *argv]
        runpy.run_module("ectune.cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001  (reported through the exit code and the .err file)
        import traceback
        traceback.print_exc()
    finally:
        if kill.get("type") == "count":
            counts["total"] = time.process_time()
            logs.with_suffix(".count").write_text(json.dumps(counts))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _Driver:
    def __init__(self, work: Path):
        self.work, self.results, self.n = work, [], 0

    def run(self, name: str, argv: list[str], kill: dict | None = None, snapshot: Path | None = None):
        """One attempt in a forked child; its exit code, or -signal if it was killed."""
        self.n += 1
        logs = self.work / "logs" / f"{self.n:02d}-{name}"
        logs.parent.mkdir(exist_ok=True)
        pid = os.fork()
        if pid == 0:
            _child(argv, kill, logs)
        status = _wait(pid, (kill or {}).get("cpu_s"))
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if code in (-signal.SIGKILL, 130) and snapshot is not None:
            shutil.copytree(argv[argv.index("--out") + 1], snapshot / f"{self.n:02d}-{name}")
        self.results.append({"name": name, "kill": kill, "code": code, "logs": str(logs)})
        return code


def _wait(pid: int, cpu_s: float | None) -> int:
    """Wait for child `pid`; SIGKILL it once it has used `cpu_s` CPU seconds (None: never)."""
    tick = os.sysconf("SC_CLK_TCK")
    while cpu_s is not None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        with open(f"/proc/{pid}/stat") as f:
            utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
        if (int(utime) + int(stime)) / tick >= cpu_s:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    return os.waitpid(pid, 0)[1]


def _resume_until_done(d: _Driver, name: str, argv: list[str], kills: list[dict], snapshots: Path) -> None:
    for kill in kills:
        d.run(name, argv, kill, snapshots)
    d.run(name, argv)                             # the same command once more: it must finish the run


def _drive(work: Path, data: str) -> None:
    # Imports shared by all children (torch.optim imports torch._dynamo lazily); not ectune.cli,
    # which each child runs as __main__.
    for module in ("torch._dynamo", "ectune.models", "ectune.training"):
        importlib.import_module(module)

    d, rng = _Driver(work), random.Random(6)
    snaps = work / "snapshots"
    snaps.mkdir()
    counts = {}
    for name, args in (("pretrain", _pretrain_args(data, str(work / "ref-pretrain"))),
                       ("tune", _tune_args(str(work / "ref-pretrain"), str(work / "ref-tune")))):
        assert d.run(f"ref-{name}", args, {"type": "count"}) == 0
        counts[name] = json.loads(Path(d.results[-1]["logs"]).with_suffix(".count").read_text())

    def random_kills(name: str, k: int) -> list[dict]:
        """k SIGKILLs at random CPU times, each within the first 5-30% of training after start-up."""
        start, total = counts[name]["start"], counts[name]["total"]
        return [{"type": "cpu", "cpu_s": start + rng.uniform(0.05, 0.3) * (total - start)} for _ in range(k)]

    # The stops that must happen come first, while the run has steps left; then the random kills.
    _resume_until_done(d, "pretrain", _pretrain_args(data, str(work / "pretrain")),
                       [{"type": "torn_write", "nth": 2}, {"type": "signal", "sig": "SIGTERM", "at": 1},
                        {"type": "before_rename", "nth": 2}, *random_kills("pretrain", 2)], snaps)
    _resume_until_done(d, "tune", _tune_args(str(work / "ref-pretrain"), str(work / "tune")),
                       [{"type": "signal", "sig": "SIGINT", "at": 1}, {"type": "before_rename", "nth": 1},
                        *random_kills("tune", 2)], snaps)
    (work / "results.json").write_text(json.dumps(d.results, indent=1))


# --- the tests
@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """Run the driver once; the tests below check what it left."""
    if not Path("/proc/self/stat").exists() or not hasattr(os, "fork"):
        pytest.skip("the kill harness forks and reads CPU times from /proc (Linux)")
    work = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    c = rng.uniform(4, 12, (32, 2, 1, 1))
    imgs = 255 * np.exp(-((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) / 18)
    np.savez(work / "blobs.npz", images=imgs.astype(np.uint8))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}     # no spinning threads on a busy CPU
    proc = subprocess.run([sys.executable, __file__, str(work), str(work / "blobs.npz")],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((work / "results.json").read_text())
    return work, results


def _final(run: Path):
    from ectune.checkpoint import list_checkpoints, read_train_state, read_weights
    last = list_checkpoints(run)[-1]
    _, tensors, _ = read_weights(last)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for rec in log:
        rec.pop("img_per_s")                      # wall-clock rate, the only field allowed to differ
    return last.name, tensors, read_train_state(last), log


def _assert_same(a, b, where="state"):
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _codes(results, name):
    return [r["code"] for r in results if r["name"] == name]


@pytest.mark.parametrize("name", ["pretrain", "tune"])
def test_interrupted_runs_end_identical_to_uninterrupted(harness, name):
    work, _ = harness
    ref = "ref-tune" if name in ("tune", "sigint") else "ref-pretrain"
    step_a, weights_a, state_a, log_a = _final(work / ref)
    step_b, weights_b, state_b, log_b = _final(work / name)
    assert step_a == step_b == f"{STEPS:08d}"
    assert weights_a.keys() == weights_b.keys() and any(k.startswith("ema.") for k in weights_a)
    _assert_same(weights_a, weights_b, "weights")            # online and EMA, bit for bit
    _assert_same(state_a, state_b, "train_state")            # optimizer, RNG, data position, counters
    _assert_same(log_a, log_b, "log")                        # one record per step, same losses and stages
    assert [r["step"] for r in log_b] == list(range(1, STEPS + 1))
    grids = sorted(p.name for p in (work / ref / "samples").iterdir())
    assert grids == sorted(p.name for p in (work / name / "samples").iterdir())
    for g in grids:                                          # the final sample grids too
        assert (work / ref / "samples" / g).read_bytes() == (work / name / "samples" / g).read_bytes()


def test_runs_were_really_killed_and_resumed(harness):
    _, results = harness
    kills = [r for r in results if r["code"] == -signal.SIGKILL]
    assert len(kills) >= 5
    assert {r["name"] for r in kills} == {"pretrain", "tune"}
    in_ckpt = [r for r in kills if r["kill"]["type"] in ("before_rename", "torn_write")]
    assert len(in_ckpt) == 3
    for name in ("pretrain", "tune"):
        assert _codes(results, name)[-1] == 0                # the last attempt finished the run
    assert all(r["code"] == 0 for r in results if r["name"].startswith("ref-"))


def test_what_a_kill_leaves_behind_loads(harness):
    from ectune.checkpoint import list_checkpoints, load_state_checked, read_train_state, read_weights, split_prefix
    from ectune.models import build_denoiser
    work, _ = harness
    snaps = sorted((work / "snapshots").iterdir())
    assert len(snaps) >= 5
    for snap in snaps:
        ckpts = list_checkpoints(snap)
        if not ckpts:                                        # killed before its first checkpoint
            continue
        cfg, tensors, _ = read_weights(ckpts[-1])
        D = build_denoiser(cfg.net)
        for prefix in ("net", "ema"):
            load_state_checked(D, split_prefix(tensors, prefix), str(snap))
        assert read_train_state(ckpts[-1])["step"] == int(ckpts[-1].name)
        assert len(ckpts) <= 4                               # keep 3 (+1 if killed before pruning)


def test_kill_during_checkpoint_write_leaves_a_temp_folder_that_the_next_save_removes(harness):
    work, results = harness
    snaps = {p.name: p for p in (work / "snapshots").iterdir()}
    for i, r in enumerate(results, 1):
        if r["code"] != -signal.SIGKILL or r["kill"]["type"] not in ("before_rename", "torn_write"):
            continue
        tmp = list((snaps[f"{i:02d}-{r['name']}"] / "checkpoints").glob(".tmp-*"))
        assert len(tmp) == 1, r
        assert sorted(p.name for p in tmp[0].iterdir()) == ["model.safetensors", "train_state.pt"]
    for name in ("pretrain", "tune"):
        assert not [p for p in (work / name / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("sig, name", [("SIGTERM", "pretrain"), ("SIGINT", "tune")])
def test_sigterm_and_sigint_checkpoint_cleanly_then_exit_130(harness, sig, name):
    from ectune.checkpoint import list_checkpoints
    work, results = harness
    stopped = next(r for r in results if r["name"] == name and (r["kill"] or {}).get("sig") == sig)
    assert stopped["code"] == 130
    err = Path(stopped["logs"]).with_suffix(".err").read_text().strip()
    assert err.startswith("ectune: interrupted: stopped at step") and "\n" not in err, err
    step = int(err.split("stopped at step ")[1].split("/")[0])
    sent = int(Path(stopped["logs"]).with_suffix(".signal").read_text())
    assert sent <= step <= sent + 1 < STEPS                     # stopped within a step of the signal
    assert f"checkpoint saved in {work / name}" in err
    snap = work / "snapshots" / f"{results.index(stopped) + 1:02d}-{name}"
    assert list_checkpoints(snap)[-1].name == f"{step:08d}"     # the clean checkpoint of that step
    assert not list((snap / "checkpoints").glob(".*"))


# --- numerics: a non-finite step is skipped and counted; a run of them stops the run
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """(npz data, a 2-step tiny teacher run) for the in-process tests below."""
    root = tmp_path_factory.mktemp("nan")
    rng = np.random.default_rng(1)
    np.savez(root / "data.npz", images=rng.integers(0, 256, (24, 16, 16), dtype=np.uint8))
    from ectune.cli import main
    assert main(_pretrain_args(str(root / "data.npz"), str(root / "teacher"))[:7] + ["--steps", "2", "--batch", "8",
                "--set", "sample.grid=4", "--set", "sample.heun_steps=2", "--no-progress"]) == 0
    return str(root / "data.npz"), str(root / "teacher")


def _poison(monkeypatch, bad: dict[int, str]) -> dict[int, dict]:
    """Make iteration i's loss NaN (bad[i] == "loss") or finite with NaN gradients ("grad").

    Returns the online weights each iteration started from, by iteration.
    """
    from ectune import training
    real, seen = training.batch_loss, {}

    def poisoned(*args, **kwargs):
        step = next(a.step for a in args if hasattr(a, "step"))           # the iteration's draws
        D = next(a for a in args if isinstance(a, torch.nn.Module))
        seen.setdefault(step, {k: v.detach().clone() for k, v in D.state_dict().items()})
        loss = real(*args, **kwargs)
        if bad.get(step) == "loss":
            return loss * float("nan")
        if bad.get(step) == "grad":                                       # + sqrt(0·Σp): value 0, gradient NaN
            return loss + torch.sqrt(next(D.parameters()).sum() * 0)
        return loss

    monkeypatch.setattr(training, "batch_loss", poisoned)
    return seen


def test_nonfinite_steps_are_skipped_counted_and_leave_the_weights(small_run, tmp_path, monkeypatch):
    from ectune.checkpoint import list_checkpoints, read_train_state, read_weights
    from ectune.cli import main
    data, _ = small_run
    seen = _poison(monkeypatch, {1: "loss", 3: "grad"})
    out = tmp_path / "run"
    assert main(_pretrain_args(data, str(out))[:7] + ["--steps", "4", "--batch", "8", "--ckpt-every", "1",
                "--set", "log_every=1", "--set", "sample.grid=4", "--set", "sample.heun_steps=2", "--no-progress"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["nonfinite_skipped"]) for r in log] == [(1, 0), (3, 1)]
    same = [all(torch.equal(seen[i][k], seen[i + 1][k]) for k in seen[i]) for i in range(3)]
    assert same == [False, True, False]                                 # only the good iterations moved them
    # The last iteration was skipped too: the run still ends with a checkpoint of its last step,
    # identical to the one before it but for the counters.
    c3, c4 = list_checkpoints(out)[-2:]
    assert (c3.name, c4.name) == ("00000003", "00000004")
    _assert_same(read_weights(c3)[1], read_weights(c4)[1], "weights")   # online and EMA untouched
    s3, s4 = read_train_state(c3), read_train_state(c4)
    _assert_same(s3["optimizer"], s4["optimizer"], "optimizer")
    assert (s3["nonfinite_total"], s4["nonfinite_total"]) == (1, 2)


def test_a_run_of_nonfinite_steps_stops_and_names_step_stage_and_last_checkpoint(small_run, tmp_path, monkeypatch,
                                                                                  capsys):
    from ectune.checkpoint import list_checkpoints, read_train_state, read_weights
    from ectune.cli import main
    _, teacher = small_run
    _poison(monkeypatch, dict.fromkeys(range(3, 100), "loss"))
    out = tmp_path / "ect"
    args = _tune_args(teacher, str(out)) + ["--ckpt-every", "2", "--set", "max_nonfinite=3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ectune: error:") and "\n" not in err, err
    last = out / "checkpoints" / "00000002"                              # iterations 3, 4, 5 were bad
    assert "3 non-finite" in err and "at step 6 (stage 5)" in err and f"checkpoint: {last}." in err, err
    assert list_checkpoints(out) == [last]
    assert read_weights(last)[0].kind == "tune" and read_train_state(last)["step"] == 2
    monkeypatch.undo()
    assert main(args) == 0                                              # the kept checkpoint resumes
    assert list_checkpoints(out)[-1].name == f"{STEPS:08d}"


if __name__ == "__main__":
    _drive(Path(sys.argv[1]), sys.argv[2])


def test_resuming_with_another_cpu_thread_count_says_the_run_will_differ_in_the_last_bits(small_run, tmp_path, capsys):
    from ectune.checkpoint import read_train_state
    from ectune.cli import main
    data, _ = small_run
    out, threads = tmp_path / "run", torch.get_num_threads()
    args = _pretrain_args(data, str(out))[:7] + ["--batch", "8", "--set", "sample.grid=4",
                                                  "--set", "sample.heun_steps=2", "--no-progress"]
    try:
        torch.set_num_threads(1)
        assert main(args + ["--steps", "1"]) == 0
        assert read_train_state(out / "checkpoints" / "00000001")["torch_threads"] == 1
        assert main(args + ["--steps", "2"]) == 0                       # the same count: no note
        assert "torch thread" not in capsys.readouterr().err
        torch.set_num_threads(2)
        assert main(args + ["--steps", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "ectune: note:" in err and "written with 1 torch thread and the run continues with 2" in err, err
    assert "OMP_NUM_THREADS=1" in err
