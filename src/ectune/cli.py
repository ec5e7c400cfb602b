"""Command-line interface: `ectune pretrain | tune | sample | presets | download`.

The CLI only builds configs and calls the library; every expected failure is an EctuneError,
printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import __version__
from .config import RunConfig, apply_overrides, preset, preset_names
from .errors import EctuneError

# Fields that may change when a run is continued (budget and cadence), not what it is.
_RESUMABLE = {"steps", "ckpt_every", "sample_every", "log_every", "keep_ckpts", "max_nonfinite", "teacher", "data"}


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder (created; an existing run there is continued)")
    p.add_argument("--data", help="fashion-mnist | DIR of images | FILE.npz | digits")
    p.add_argument("--preset", help=f"config preset: {', '.join(preset_names())}")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="iterations to train in total")
    budget.add_argument("--kimg", type=float, help="thousands of training images in total")
    p.add_argument("--batch", type=int, help="global batch size")
    p.add_argument("--seed", type=int)
    p.add_argument("--ckpt-every", type=int, help="iterations between checkpoints")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set loss.q=4 --set optim.lr=2e-4")
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
    return cfg


def _prepare_run(cfg: RunConfig, out: Path) -> RunConfig:
    """Create the run folder, or check that an existing one holds this same run (then it resumes)."""
    cfg_file = out / "config.json"
    if cfg_file.exists():
        try:
            old = RunConfig.from_dict(json.loads(cfg_file.read_text()))
        except (json.JSONDecodeError, EctuneError) as e:
            raise EctuneError(f"{cfg_file} is unreadable ({e}); choose another --out") from None
        a, b = dataclasses.asdict(old), dataclasses.asdict(cfg)
        diff = sorted(k for k in a if k not in _RESUMABLE and a[k] != b[k])
        if diff:
            raise EctuneError(f"{out} holds a different run (differs in {diff}); choose another --out "
                              "or repeat the original settings to continue it")
    elif out.exists() and any(out.iterdir()):
        raise EctuneError(f"{out} exists and is not an ectune run folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.json.tmp"
    tmp.write_text(cfg.to_json())
    os.replace(tmp, cfg_file)
    return cfg


def _load_data(spec: str):
    from .data import load_dataset
    ds = load_dataset(spec)
    h, w = ds.images.shape[2:]
    if h != w:
        raise EctuneError(f"images must be square for the UNet, got {h}x{w}; crop or resize the dataset")
    return ds


def cmd_pretrain(args) -> None:
    from .models import build_denoiser, resolve_device
    from .training import train
    base = preset(args.preset or "fmnist", "pretrain")
    cfg = _configure(args, base)
    device = resolve_device(args.device)
    ds = _load_data(cfg.data)
    label_dim = ds.num_classes if args.cond else cfg.net.label_dim
    if label_dim and ds.labels is None:
        raise EctuneError(f"--cond needs class labels but {cfg.data} has none")
    net = replace(cfg.net, img_resolution=ds.images.shape[2], in_channels=ds.images.shape[1], label_dim=label_dim)
    cfg = _prepare_run(replace(cfg, net=net), Path(args.out))
    state = train(cfg, Path(args.out), ds, build_denoiser(cfg.net, cfg.seed), device=device, progress=not args.no_progress)
    _report(state, cfg, args.out)


def cmd_tune(args) -> None:
    from .checkpoint import read_weights
    from .models import resolve_device, student_from
    from .training import train
    t_cfg, tensors, _ = read_weights(args.teacher)
    base = preset(args.preset or t_cfg.preset, "tune")
    base = replace(base, data=t_cfg.data, teacher=str(args.teacher),
                   net=replace(t_cfg.net, dropout=base.net.dropout), sample=replace(base.sample))
    cfg = _configure(args, base)
    cfg = replace(cfg, loss=replace(cfg.loss, stage_iters=cfg.stage_iters))     # freeze the stage schedule
    device = resolve_device(args.device)
    ds = _load_data(cfg.data)
    want = (cfg.net.in_channels, cfg.net.img_resolution)
    if (ds.images.shape[1], ds.images.shape[2]) != want:
        raise EctuneError(f"data {cfg.data} is {ds.images.shape[1]}x{ds.images.shape[2]}px (channels x size) but "
                          f"the teacher expects {want[0]}x{want[1]}px; tune on data of the teacher's shape")
    if cfg.net.label_dim and (ds.labels is None or ds.num_classes > cfg.net.label_dim):
        raise EctuneError(f"the teacher is class-conditional ({cfg.net.label_dim} classes) but {cfg.data} has "
                          "no labels in that range; tune on labelled data")
    cfg = _prepare_run(cfg, Path(args.out))
    D = student_from(tensors, cfg.net, f"teacher {args.teacher}")
    state = train(cfg, Path(args.out), ds, D, device=device, progress=not args.no_progress)
    _report(state, cfg, args.out)


def _report(state, cfg: RunConfig, out) -> None:
    if state.stop_requested:
        raise KeyboardInterrupt(f"stopped at step {state.step}/{cfg.steps}; checkpoint saved in {out}; "
                                "run the same command to continue")
    print(f"{cfg.kind} done: {cfg.steps} steps ({cfg.steps * cfg.batch / 1000:.1f} kimg) in {out}")


def cmd_sample(args) -> None:
    import torch
    from .images import save_samples
    from .models import load_denoiser, resolve_device
    from .sampling import default_consistency_times, sample_images
    device = resolve_device(args.device)
    D, cfg = load_denoiser(args.ckpt, which=args.weights, device=device)
    sampler = args.sampler or ("heun" if cfg.kind == "pretrain" else "consistency")
    ts = args.ts or default_consistency_times(args.steps, cfg.sample.mid_ts, cfg.sample.t_max)
    seeds = list(range(args.seed, args.seed + args.n))
    shape = (cfg.net.in_channels, cfg.net.img_resolution, cfg.net.img_resolution)
    labels = None
    if cfg.net.label_dim:
        labels = torch.full((args.n,), args.label) if args.label is not None else torch.tensor(seeds) % cfg.net.label_dim
    try:
        x = sample_images(D, seeds, shape, sampler=sampler, ts=ts, heun_steps=args.num_steps,
                          class_labels=labels, batch=args.batch, device=device)
    except ValueError as e:
        raise EctuneError(str(e)) from None
    save_samples(x, args.out, seeds)
    what = f"heun {args.num_steps} steps" if sampler == "heun" else f"consistency ts={[round(t, 4) for t in ts]}"
    print(f"wrote {args.n} samples ({what}) to {args.out}")


def cmd_eval(args) -> None:
    from .evaluate import provenance, reference, score_samples
    from .models import load_denoiser, resolve_device
    from .sampling import default_consistency_times, heun_nfe, sample_images
    device = resolve_device(args.device)
    D, cfg = load_denoiser(args.ckpt, which=args.weights, device=device)
    if (cfg.net.in_channels, cfg.net.img_resolution) != (1, 28):
        raise EctuneError("ectune eval measures Fashion-MNIST-shaped models (1x28x28) in its classifier's features")
    sampler = args.sampler or ("heun" if cfg.kind == "pretrain" else "consistency")
    ts = args.ts or default_consistency_times(args.steps, cfg.sample.mid_ts, cfg.sample.t_max)
    seeds = list(range(args.seed, args.seed + args.n))
    ref = reference()
    t0 = time.perf_counter()
    x = sample_images(D, seeds, (1, 28, 28), sampler=sampler, ts=ts, heun_steps=args.num_steps,
                      batch=args.batch, device=device)
    seconds = time.perf_counter() - t0
    spec = ({"name": "heun", "num_steps": args.num_steps, "nfe": heun_nfe(args.num_steps)} if sampler == "heun"
            else {"name": "consistency", "ts": list(ts), "nfe": len(ts)})
    result = {**score_samples(x, ref), "seconds_per_image": seconds / args.n,
              **provenance(args.ckpt, spec, seeds, ref[3], args.weights)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"FD {result['fd']:.3f}  KID {result['kid']:.3f}  precision {result['precision']:.3f}  "
          f"recall {result['recall']:.3f}  ({args.n} samples, {spec['name']}, NFE {spec['nfe']}) -> {args.out}")


def cmd_presets(args) -> None:
    from .models import build_denoiser
    from .networks import count_parameters
    if args.show:
        print(preset(args.show, args.kind).to_json())
        return
    for name in preset_names():
        cfg = preset(name, "tune")
        n = count_parameters(build_denoiser(cfg.net))
        print(f"{name:10s} net={cfg.net.size:8s} {n / 1e6:7.2f}M params  {cfg.net.img_resolution}px  "
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
    dest = download_fashion_mnist(Path(args.dest).expanduser())
    print(f"Fashion-MNIST in {dest}; use --data fashion-mnist:{dest} or ECTUNE_DATA={dest}")


def _add_sampler_args(p: argparse.ArgumentParser, *, n: int, batch: int) -> None:
    """What `sample` and `eval` share: the checkpoint, the sampler and the seeds."""
    p.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or .safetensors file")
    p.add_argument("--steps", type=int, default=1, help="consistency sampler steps (1, 2, ... k)")
    p.add_argument("--ts", type=float, nargs="+", help="explicit consistency times, e.g. 80 1.5")
    p.add_argument("--sampler", choices=["consistency", "heun"], help="default: heun for a pretrain run")
    p.add_argument("--num-steps", type=int, default=18, help="Heun noise levels N (NFE = 2N-1)")
    p.add_argument("--n", type=int, default=n, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i")
    p.add_argument("--weights", default="ema", help="ema | net (online weights)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ectune", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"ectune {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="train an EDM diffusion model (the teacher)")
    _add_run_args(p)
    p.add_argument("--cond", action="store_true", help="class-conditional on the dataset's labels")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("tune", help="Easy Consistency Tuning from a teacher's EMA weights")
    p.add_argument("--teacher", required=True, help="teacher run folder or weights file")
    _add_run_args(p)
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("sample", help="generate samples as a PNG grid or an .npz")
    _add_sampler_args(p, n=64, batch=256)
    p.add_argument("--label", type=int, help="class label for a conditional model (default: seed %% classes)")
    p.add_argument("--out", required=True, help=".png grid or .npz (uint8 NxCxHxW + seeds)")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("eval", help="score samples of a checkpoint (classifier FD, KID, precision/recall)")
    _add_sampler_args(p, n=10000, batch=500)
    p.add_argument("--out", required=True, help="JSON result file")
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
    p.add_argument("--dest", default="~/.cache/ectune/fashion-mnist")
    p.set_defaults(func=cmd_download)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EctuneError as e:
        print(f"ectune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"ectune: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
