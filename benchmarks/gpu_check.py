"""GPU check (issue #5): training images/s of a preset in fp32 / bf16 / bf16 + torch.compile, and
whether the bf16 loss agrees with fp32 on the same batch. Runs the library's own training step.

    python benchmarks/gpu_check.py                      # CIFAR-10 preset on cuda, < 5 minutes on one GPU
    python benchmarks/gpu_check.py --preset tiny --device cpu --seconds 3    # a smoke run anywhere
    python benchmarks/gpu_check.py --preset imagenet64 --no-compile          # EDM2-S ECT at batch 128

Prints a table and writes benchmarks/results/gpu_check.json. Random images of the preset's shape are
enough for speed; the network starts from random weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from ectune import __version__
from ectune.models import build_denoiser, resolve_device
from ectune.presets import preset
from ectune.training import batch_loss, draw, stepping


def measure(cfg, device, seconds: float, warmup: int) -> dict:
    """Images/s of full ECT iterations (draw, forward + target, backward, step, EMA) for `cfg`."""
    torch.manual_seed(0)
    n, c, r = 4 * cfg.batch, cfg.net.in_channels, cfg.net.img_resolution
    images = torch.randint(0, 256, (n, c, r, r), dtype=torch.uint8, device=device)
    labels = torch.randint(0, max(cfg.net.label_dim, 1), (n,), device=device) if cfg.net.label_dim else None
    with stepping(cfg, build_denoiser(cfg.net), images, labels, device=device) as step:
        return _timed(step, cfg, device, seconds, warmup)


def _timed(step, cfg, device, seconds: float, warmup: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    _sync(device)
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"img_per_s": steps * cfg.batch / dt, "steps": steps, "seconds": dt, "warmup_seconds": warm_s,
            "max_mem_gib": mem}


def loss_agreement(cfg, device) -> dict:
    """The same batch and draws through fp32 and bf16: relative difference of the mean ECT loss."""
    D = build_denoiser(replace(cfg.net, dropout=0.0)).to(device).train()
    with torch.no_grad():                   # the output layer starts at zero (F = 0): perturb it all
        g = torch.Generator().manual_seed(1)
        for p in D.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(device))
    x0 = torch.rand(cfg.batch, cfg.net.in_channels, cfg.net.img_resolution, cfg.net.img_resolution,
                    device=device) * 2 - 1
    labels = (torch.arange(cfg.batch, device=device) % cfg.net.label_dim) if cfg.net.label_dim else None
    d = draw(replace(cfg, steps=cfg.steps), cfg.batch, tuple(x0.shape[1:]), cfg.stage_length * 3,
             torch.Generator(device=device).manual_seed(0))
    with torch.no_grad():
        fp32 = batch_loss(cfg, D, x0, labels, d).mean().item()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = batch_loss(cfg, D, x0, labels, d).mean().item()
    return {"fp32_loss": fp32, "bf16_loss": bf16, "rel_diff": abs(bf16 - fp32) / abs(fp32)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cifar10")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", type=float, default=30.0, help="timed seconds per setting")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations first (compilation happens here)")
    ap.add_argument("--batch", type=int, help="override the preset's batch")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cfg = preset(args.preset, "tune")
    if args.batch:
        cfg = replace(cfg, batch=args.batch)
    settings = {"fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"},
                "bf16+channels_last": {"precision": "bf16", "channels_last": True}}
    if not args.no_compile:
        settings["bf16+compile"] = {"precision": "bf16", "compile": True}
    rows = {}
    for name, eng in settings.items():
        rows[name] = measure(replace(cfg, engine=replace(cfg.engine, **eng)), device, args.seconds, args.warmup)
        print(f"{name:20s} {rows[name]['img_per_s']:9.1f} img/s  ({rows[name]['steps']} steps timed)", flush=True)
    agree = loss_agreement(cfg, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\n{args.preset} tune, batch {cfg.batch}, on {gpu}")
    print("| setting | img/s | × fp32 |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['img_per_s']:.1f} | {r['img_per_s'] / rows['fp32']['img_per_s']:.2f} |")
    print(f"bf16 vs fp32 loss on one batch: {agree['bf16_loss']:.5g} vs {agree['fp32_loss']:.5g} "
          f"(relative difference {agree['rel_diff']:.2e})")
    out = {"preset": args.preset, "batch": cfg.batch, "device": gpu, "torch": torch.__version__,
           "ectune": __version__, "rows": rows, "loss_agreement": agree, "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
