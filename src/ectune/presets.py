"""The presets: named pairs of run configs (pretrain, tune) for a dataset and network size.

`preset(name, kind)` is a `RunConfig` of config.py; `ectune presets` lists them, `--preset` picks one.
The network sizes come from `networks.NETWORK_PRESETS`; the recipes and their sources are noted by each.
"""

from __future__ import annotations

from dataclasses import replace

from .config import EMAConfig, EngineConfig, EvalConfig, LossConfig, NetConfig, OptimConfig, RunConfig, SampleConfig
from .errors import EctuneError


def _net(size: str, **overrides) -> NetConfig:
    """The NETWORK_PRESETS entry `size` as a NetConfig, with `overrides` (the data's shape) applied."""
    from .networks import NETWORK_PRESETS
    p = {**NETWORK_PRESETS[size], **overrides}
    return NetConfig(size=size, **{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})


# What a tuning run starts from unless its preset says otherwise: ECT's loss (ECT.md §7) and RAdam.
_ECT_LOSS = LossConfig(method="ect", P_mean=-1.1, P_std=2.0, q=2.0, stages=8)
_RADAM = OptimConfig(name="radam", lr=1e-4, betas=(0.9, 0.999))
# In-loop evaluation of the GPU recipes: Inception FID of 5,000 samples every 1,280k images (10 per 12.8M).
_GPU_EVAL = EvalConfig(every_kimg=1280.0, n=5000, metric="inception")


# "fmnist-short": tuning budgets up to ~1% of the teacher's pretraining images (the demo's 21.8k and the
# compare budget's 25.6k), chosen by benchmarks/recipe_sweep.py on held-out seeds (README, "The
# small-budget recipe"): ECT with the variance-reduced r-point (SCT), a wider ln t ~ N(−0.2, 2.4²) and a
# narrow power EMA (σ_rel 0.015: with 8 stages in 400 steps a wider one averages in weights of earlier,
# coarser stages); its 1-step FD was 254 / 248 on two training seeds, against 354 for N(−0.6, 2²).
# 2-step sampling with CTM's γ-sampling at γ = 0 (deterministic) and mid time 3.0: the joint (mid time,
# γ) searches on held-out seeds chose γ 0 at 3.09 on every run searched. 400 steps of 64 with four
# in-loop evaluations of 200 samples. At 10% of pretraining (6,000 steps, one training seed) the same
# recipe gave 1-step FD 61.8 against exact ECT's 119.3, and 2 steps at γ 0 28.4 at mid 4.57 (README).
_FMNIST_SHORT = dict(batch=64, steps=400, ckpt_every=50, eval=EvalConfig(every_kimg=6.4, n=200),
                     sample=SampleConfig(mid_ts=(3.0,), gamma=0.0),
                     loss=replace(_ECT_LOSS, method="sct", P_mean=-0.2, P_std=2.4), ema=EMAConfig(sigma_rel=0.015))


def _edm2_net(size: str, **overrides) -> NetConfig:
    """EDM2's ImageNet-64 network of a size ("xs" ... "xl"): class-conditional, 64×64×3."""
    from .networks import EDM2_SIZES
    p = dict(model_channels=EDM2_SIZES[size]["model_channels"], dropout=EDM2_SIZES[size]["dropout"],
             channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(16, 8),
             img_resolution=64, in_channels=3, label_dim=1000)
    return NetConfig(size=f"edm2-{size}", arch="edm2", **{**p, **overrides})


# The official ECT `imgnet` branch's presets (edm2-img64-*): learning rate and tuning dropout per size.
_ECT_IMGNET = {"s": (1e-3, 0.40), "m": (9e-4, 0.50), "l": (8e-4, 0.50), "xl": (7e-4, 0.50)}
# EDM2's own pretraining presets (edm2-img64-*): learning rate per size.
_EDM2_IMGNET_LR = {"s": 1e-2, "m": 9e-3, "l": 8e-3, "xl": 7e-3}


def _imagenet64_presets() -> dict[str, dict]:
    """ImageNet-64 on EDM2 networks: "imagenet64" (EDM2-S) and "imagenet64-m/-l/-xl".

    tune: the official ECT `imgnet` branch (run_imgnet_ecm.sh with its edm2-img64-* presets): Adam
    (0.9, 0.99) with inverse-sqrt decay from 2,000 iterations, batch 128, 100k iterations (12.8M
    images) in 4 stages of 25k, q = 4, k = 8, b = 1, c = 0.06, "snr" weighting, ln t ~ N(−0.8, 1.6²),
    dropout only at resolutions <= 16, fp32 with TF32, no logvar head, mid time 1.526. Its EMA is a
    power-function EMA at σ_rel 0.010 / 0.050 / 0.100 (one snapshot each); ectune keeps one, 0.050.
    pretrain: EDM2's own (train_edm2.py): batch 2048, 2^30 images (M: 2^31), lr ramp over 10M images
    and inverse-sqrt decay from 35k iterations, the EDM2 loss with the logvar head, EMA σ_rel 0.05.
    """
    out = {}
    for size, (lr, dropout) in _ECT_IMGNET.items():
        net = _edm2_net(size)
        pre_steps = (2 << 30 if size == "m" else 1 << 30) // 2048
        out["imagenet64" if size == "s" else f"imagenet64-{size}"] = dict(
            net=net, batch=128, steps=100000, ckpt_every=2500, sample_every=10000,
            sample=SampleConfig(mid_ts=(1.526,)),
            pretrain=dict(net=replace(net, logvar_channels=128), batch=2048, steps=pre_steps, ckpt_every=5000,
                          loss=LossConfig(method="edm", P_mean=-0.8, P_std=1.6),
                          optim=OptimConfig(lr=_EDM2_IMGNET_LR[size], betas=(0.9, 0.99),
                                            warmup_steps=4883, lr_ref_steps=35000)),
            tune=dict(net=replace(net, dropout=dropout, dropout_res=16), eval=_GPU_EVAL,
                      loss=LossConfig(method="ect", P_mean=-0.8, P_std=1.6, q=4.0, stages=4, stage_iters=25000,
                                      c=0.06, weighting="snr"),
                      optim=OptimConfig(name="adam", lr=lr, betas=(0.9, 0.99), lr_ref_steps=2000)))
    return out


def _cifar10_presets() -> dict[str, dict]:
    """CIFAR-10 on EDM's DDPM++ (55.7M): "cifar10", ECT.md §7 (batch 128, q = 2, 8 stages of 25k
    iterations), and "cifar10-fast", ECT.md §4.2 (q = 256 from the first iteration, one stage, EMA
    0.9993). Both pretrain as EDM did and tune with dropout 0.2, in the official code's precision: fp32
    with TF32 off (its --fp16 and --tf32 default to False; bf16's 2⁻⁸ resolution is the size of the last
    stage's Δt/t = n(t)/256). `--set engine.precision=bf16` or `engine.tf32=true` opts in to faster ones."""
    net = _net("ddpmpp", img_resolution=32, in_channels=3)
    common = dict(net=net, batch=128, steps=200000, ckpt_every=5000, sample_every=10000,
                  engine=EngineConfig(precision="fp32", tf32=False),
                  sample=SampleConfig(mid_ts=(0.821,)),
                  pretrain=dict(batch=512, steps=390625, optim=OptimConfig(lr=1e-3, warmup_steps=19531),
                                ema=EMAConfig(kind="fixed", beta=0.999)))
    tune = dict(net=replace(net, dropout=0.2), eval=_GPU_EVAL)
    return {
        "cifar10": dict(common, tune=dict(tune, loss=replace(_ECT_LOSS, stage_iters=25000),
                                          ema=EMAConfig(kind="fixed", beta=0.9999))),
        "cifar10-fast": dict(common, tune=dict(tune, loss=replace(_ECT_LOSS, q=256.0, stages=1, stage_iters=200000),
                                               ema=EMAConfig(kind="fixed", beta=0.9993))),
    }


def _presets() -> dict[str, dict[str, RunConfig]]:
    """The preset table: name → {"pretrain": RunConfig, "tune": RunConfig}."""
    # Fashion-MNIST 28x28 on a laptop CPU: ~1M parameters, ~170 img/s pretraining on 2 cores.
    fmnist = dict(net=_net("small"), batch=128, steps=10000, ckpt_every=500, sample_every=1000,
                  sample=SampleConfig(mid_ts=(1.5,)),
                  pretrain=dict(optim=OptimConfig(lr=1e-3, warmup_steps=200), eval=EvalConfig(every_kimg=320.0)),
                  tune=dict(steps=2000, eval=EvalConfig(every_kimg=64.0)))
    table = {
        # Seconds on CPU: for tests and examples.
        "tiny": dict(net=_net("tiny"), batch=16, steps=20, ckpt_every=10, sample_every=10, log_every=5,
                     sample=SampleConfig(heun_steps=4, mid_ts=(1.5,), grid=16),
                     pretrain=dict(optim=OptimConfig(lr=2e-3)), tune=dict(steps=20)),
        "fmnist": fmnist,
        "fmnist-short": dict(fmnist, tune=_FMNIST_SHORT),   # its short-budget tuning recipe; pretrains as "fmnist"
        **_cifar10_presets(),
        **_imagenet64_presets(),
    }
    return {name: _pretrain_and_tune(name, p) for name, p in table.items()}


def _pretrain_and_tune(name: str, entry: dict) -> dict[str, RunConfig]:
    """A table entry's two configs: its shared fields with its "pretrain" or "tune" fields over them;
    tuning starts from ECT's loss and RAdam."""
    common = {k: v for k, v in entry.items() if k not in ("pretrain", "tune")}
    return {"pretrain": RunConfig(preset=name, **{**common, **entry["pretrain"]}),
            "tune": RunConfig(preset=name, **{**common, "loss": _ECT_LOSS, "optim": _RADAM, **entry["tune"]})}


def preset(name: str, kind: str) -> RunConfig:
    """The preset `name` for a `kind` ("pretrain" or "tune") run."""
    table = _presets()
    if name not in table:
        raise EctuneError(f"unknown preset {name!r}; choose one of {sorted(table)} (see `ectune presets`)")
    return table[name][kind]


def preset_names() -> list[str]:
    return sorted(_presets())
