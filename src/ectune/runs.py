"""Runs: the one place that creates, freezes, locks, continues and ends a training run
(`train_run`, which returns a `RunResult`), and the rules of a run folder: what a run was trained on,
when an existing folder may be continued, and what a failed first start leaves behind.

Besides config.json a run folder holds `data.json`, the fingerprint of the dataset it was created
with (size, image shape, classes and a sha256 of the uint8 images and labels the sampler reads), so
that a continued run is refused on other data even of the same size. Runs made before the
fingerprint existed record it when they are next continued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import distributed
from .atomic import atomic_file
from .checkpoint import CKPT_DIR, RunMismatch, checkpoint_folders
from .config import RunConfig, read_config
from .errors import EctuneError

DATA_FILE = "data.json"
LOCK = ".lock"             # held by the process training in a run folder (see `locked`)
_OURS = ("config.json", "config.json.tmp", DATA_FILE, LOCK, "log.jsonl")   # what a start writes first

# Fields that may change when a run is continued (budget and cadence), not what it is.
RESUMABLE = {"steps", "ckpt_every", "sample_every", "log_every", "keep_ckpts", "max_nonfinite", "teacher", "data",
             "engine", "eval"}


@dataclass(frozen=True)
class RunResult:
    """What `train_run` did: `status` is "trained" (it reached cfg.steps), "stopped" (a signal: the
    checkpoint is saved, the same call continues it), "complete" (it was already at cfg.steps) or
    "past" (already beyond cfg.steps: nothing to do). `state` holds the networks (D, ema.module)."""
    out: Path
    cfg: RunConfig
    status: str
    start_step: int
    step: int
    state: object


def train_run(cfg: RunConfig, out: Path, ds, D, *, device, teacher=None, resume: str = "auto",
              progress: bool = True, notes: tuple[str, ...] = ()) -> RunResult:
    """Train the run `cfg` in `out` on `ds`, starting from network D: create the folder (config.json
    with the schedule frozen by the method, data.json), or check that it holds this same run on the
    same data and continue it exactly (`resume="never"` refuses that); hold its lock while training.
    A bad config is refused before anything is written; a failed first start leaves nothing behind.
    `notes` are printed (rank 0) once the run is open. Under torchrun every process calls this."""
    from .training import check_trainable, train
    out = Path(out)
    check_trainable(cfg, D, len(ds), device)
    cfg = freeze(cfg, out)
    fp = data_fingerprint(ds, cfg.data) if distributed.is_main() else None
    resumed = (out / "config.json").is_file()
    with contextlib.ExitStack() as held, first_start(out), mismatch_names_data(out, cfg.data):
        distributed.on_main(lambda: open_run(cfg, out, resume, fp, held))
        for note in notes if distributed.is_main() else ():
            print(f"ectune: note: {note}", file=sys.stderr)
        state = train(cfg, out, ds, D, device=device, progress=progress, teacher=teacher,
                      on_start=lambda s: started(cfg, out, fp, resumed, s))
    status = ("stopped" if state.ended_early else "past" if state.start_step > cfg.steps else
              "complete" if state.start_step == cfg.steps else "trained")
    return RunResult(out, cfg, status, state.start_step, state.step, state)


def freeze(cfg: RunConfig, out: Path) -> RunConfig:
    """`cfg` with the schedule lengths that follow --steps fixed: by its method when the run is
    created (ECT's stage length, iCT's curriculum, sCM's warm-up), from its config.json when it is continued (so a
    larger --steps extends the run instead of moving its stage boundaries)."""
    from .methods import method
    try:
        old = read_config(Path(out) / "config.json") if (Path(out) / "config.json").is_file() else None
    except EctuneError:
        old = None                                  # open_run reports it
    if old is None:
        return method(cfg.loss.method).freeze(cfg)
    L = cfg.loss
    return replace(cfg, loss=replace(L, stage_iters=L.stage_iters or old.loss.stage_iters,
                                     ict_total_steps=L.ict_total_steps or old.loss.ict_total_steps,
                                     scm_warmup=L.scm_warmup or old.loss.scm_warmup))


def open_run(cfg: RunConfig, out: Path, resume: str, fp: dict | None, held: contextlib.ExitStack) -> None:
    """Create the run folder (config.json, data.json: the data fingerprint `fp`), or check that an
    existing one holds this same run on the same data (its config.json is rewritten only once
    training starts, see `started`, so a refused resume changes nothing); lock it until `held` closes."""
    if (out / "config.json").exists():
        check_continuable(cfg, out, resume, fp, RESUMABLE)
        held.enter_context(locked(out))
        return
    if out.exists() and (not out.is_dir() or not all(start_leftover(p.name) for p in out.iterdir())):
        # (the lock, data.json and temporaries alone: a first start that was killed)
        raise EctuneError(f"{out} exists and is not an ectune run folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EctuneError(f"cannot create {out} ({e}); check the permissions of its parent or choose another --out") from None
    held.enter_context(locked(out))
    if fp is not None:
        record_data(out, fp)
    write_config(out, cfg.to_json())


@contextlib.contextmanager
def locked(out: Path):
    """Hold OUT/.lock, so that a second process on the same run folder is refused instead of
    interleaving checkpoints. The OS drops the lock with the process, so a killed run leaves none
    behind. (Not on Windows, which has no fcntl.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(Path(out) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EctuneError(f"{out} is in use by another ectune process; wait for it to finish or choose "
                          "another --out") from None
    try:
        yield
    finally:
        os.close(fd)                                # closing the descriptor releases its flock


def data_fingerprint(ds, spec: str) -> dict:
    """What identifies a dataset to the sampler: its spec (for messages), size, image shape, number of
    classes and a sha256 over the images' and labels' bytes (one pass: about 0.1 s for 60k 28x28)."""
    h = hashlib.sha256()
    for name, t in (("images", ds.images), ("labels", ds.labels)):
        if t is None:
            continue
        a = np.ascontiguousarray(t.numpy())
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return {"spec": spec, "n": len(ds), "shape": list(ds.images.shape[1:]), "classes": ds.num_classes,
            "sha256": h.hexdigest()}


def _describe(fp: dict) -> str:
    shape = "x".join(map(str, fp.get("shape", [])))
    return f"--data {fp.get('spec')} ({fp.get('n')} images of {shape}, {fp.get('classes')} classes, " \
           f"sha256 {str(fp.get('sha256'))[:12]})"


def read_fingerprint(out: Path) -> dict | None:
    """The run's recorded data fingerprint; None for a run made before fingerprints."""
    f = Path(out) / DATA_FILE
    if not f.is_file():
        return None
    try:
        fp = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EctuneError(f"cannot read {f} ({e}); it records the run's data: restore it or choose another --out") from None
    if not isinstance(fp, dict) or not isinstance(fp.get("sha256"), str):
        raise EctuneError(f"{f} is not a data fingerprint; restore it or choose another --out")
    return fp


def check_same_data(out: Path, fp: dict) -> None:
    """Refuse to continue the run in `out` on data other than the one it was created with."""
    old = read_fingerprint(out)
    keys = ("n", "shape", "classes", "sha256")
    if old is not None and any(old.get(k) != fp[k] for k in keys):
        raise EctuneError(f"{out} was trained on {_describe(old)} but this command passes {_describe(fp)}; "
                          f"pass the original --data {old.get('spec')} to continue it, or a new --out for a new run")


def record_data(out: Path, fp: dict) -> None:
    """Write the data fingerprint of the run (atomically)."""
    _write(Path(out) / DATA_FILE, json.dumps(fp, indent=1) + "\n")


def write_config(out: Path, text: str) -> None:
    """Write config.json (atomically), unless it already holds exactly `text`."""
    f = Path(out) / "config.json"
    if not (f.is_file() and f.read_bytes() == text.encode("utf-8")):
        _write(f, text)


def _write(f: Path, text: str) -> None:
    try:
        with atomic_file(f) as handle:
            handle.write(text.encode("utf-8"))
    except OSError as e:
        raise EctuneError(f"cannot write {f} ({e}); check the permissions of {f.parent} or free disk space") from None


def check_not_restarted(out: Path) -> None:
    """Refuse to train an existing run from step 0 after its checkpoints were removed: that would
    silently replace its log. (A run stopped before its first checkpoint has no checkpoints folder,
    or only the leftovers of an unfinished save, and starts again.)"""
    root = Path(out) / CKPT_DIR
    if root.is_dir() and not checkpoint_folders(out) and not any(root.iterdir()):
        raise EctuneError(f"{out} holds a run whose checkpoints were removed; ectune does not start a run over "
                          f"in place: remove {out} to start over, or choose another --out")


def check_continuable(cfg: RunConfig, out: Path, resume: str, fp: dict | None, resumable: set[str]) -> None:
    """Refuse to continue the run in `out` with other settings (but the `resumable` fields) or data,
    or from scratch."""
    if resume == "never":
        raise EctuneError(f"{out} already holds a run and --resume never was given; to start over remove {out} "
                          "or choose another --out (or drop --resume never to continue it)")
    try:
        old = read_config(out / "config.json")
    except EctuneError as e:
        raise EctuneError(f"{e}; choose another --out") from None
    a, b = dataclasses.asdict(old), dataclasses.asdict(cfg)
    diff = sorted(k for k in a if k not in resumable and a[k] != b[k])
    from .methods import method
    frozen = method(cfg.loss.method).frozen_teacher
    if frozen and old.teacher and Path(old.teacher).resolve() != Path(cfg.teacher).resolve():
        diff.append("teacher")    # CD's target is the teacher's ODE step: another teacher is another run
    if diff:
        raise EctuneError(f"{out} holds a different run (differs in {diff}); choose another --out "
                          "or repeat the original settings to continue it")
    if fp is not None:
        check_same_data(out, fp)
    check_not_restarted(out)


def started(cfg: RunConfig, out: Path, fp: dict | None, resumed: bool, state) -> None:
    """Once the run's checkpoint is restored and steps are left: say so, record this command's config
    (budget and cadence may have changed) and, for a run made before fingerprints, its data."""
    if resumed:
        print(f"resuming {out} from step {state.step}/{cfg.steps}", flush=True)
    write_config(out, cfg.to_json())
    if fp is not None and read_fingerprint(out) is None:
        record_data(out, fp)


@contextlib.contextmanager
def mismatch_names_data(out: Path, spec: str):
    """Give a RunMismatch of a resume (checkpoints of other data) its run, data and what to do."""
    try:
        yield
    except RunMismatch as e:
        try:
            old = f" --data {read_config(Path(out) / 'config.json').data}"
        except EctuneError:
            old = " --data"
        raise EctuneError(f"{out} cannot continue on --data {spec}: {e}; pass the original{old} to "
                          "continue it, or a new --out for a new run") from None


def start_leftover(name: str) -> bool:
    """Whether a file name is one that a first start writes before training (or its temporary)."""
    return name in _OURS or (name.startswith(".") and name.endswith(".tmp"))


def _is_fresh(out: Path) -> bool:
    return not out.exists() or (out.is_dir() and all(start_leftover(p.name) for p in out.iterdir()))


@contextlib.contextmanager
def first_start(out: Path):
    """Run a command that may create `out`; if it fails before training wrote anything, remove what
    it made, so that the corrected command starts cleanly. Only an `out` that did not exist or was
    empty before is touched."""
    out = Path(out)
    existed = out.exists()
    empty = not existed or (out.is_dir() and not any(out.iterdir()))
    try:
        yield
    except Exception:
        if empty and distributed.is_main() and _is_fresh(out) and _log_empty(out):
            _remove_start(out, existed)
        raise


def _log_empty(out: Path) -> bool:
    log = out / "log.jsonl"
    return not log.exists() or log.stat().st_size == 0


def _remove_start(out: Path, existed: bool) -> None:
    for p in out.iterdir():
        with contextlib.suppress(OSError):
            p.unlink()                      # (all of them start leftovers: see _is_fresh)
    if not existed:
        with contextlib.suppress(OSError):
            out.rmdir()                     # only if empty
