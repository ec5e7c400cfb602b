"""Typed, frozen run configurations (the preset table is presets.py).

A run is described completely by one `RunConfig`, saved as JSON next to every run and inside every
checkpoint. The CLI only builds configs: a preset, then budget flags, then `--set section.field=value`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EctuneError


@dataclass(frozen=True)
class NetConfig:
    """The denoiser: network architecture and preconditioning; resolution, channels and label_dim
    come from the data. ``arch`` "ddpmpp" is EDM's SongUNet, "edm2" EDM2's magnitude-preserving U-Net
    (its fields ``channel_mult_noise``, ``dropout_res`` and ``logvar_channels`` apply to it only).

    Presets take widths, depths, attention and dropout from one table, ``ectune.networks.NETWORK_PRESETS``
    (EDM2's from ``EDM2_SIZES``), and name the entry in ``size``. The defaults below are not a preset:
    they are what a config file that leaves a field out gets, and the examples ``--set`` errors show."""
    size: str = "custom"                    # the NETWORK_PRESETS / EDM2 size the fields came from
    arch: str = "ddpmpp"                    # "ddpmpp" (SongUNet) | "edm2"
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (7,)
    dropout: float = 0.1
    label_dropout: float = 0.0
    img_resolution: int = 28
    in_channels: int = 1
    label_dim: int = 0                      # 0 = unconditional
    sigma_data: float = 0.5
    channel_mult_noise: int = 1             # edm2: Fourier-embedding width / model_channels
    dropout_res: int = 0                    # edm2: > 0 applies dropout only at resolutions <= this
    logvar_channels: int = 0                # edm2: > 0 adds the uncertainty head u(sigma) (EDM2 Eq. 21)
    eval_sigma_min: float = 0.0             # > 0: official ECT's eval-mode shift of c_skip/c_out by sigma_min
    truncate_t: float = 0.0                 # > 0: TCM's model, a frozen stage-1 copy below this sigma (t')

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network takes and its samples."""
        return self.in_channels, self.img_resolution, self.img_resolution


@dataclass(frozen=True)
class LossConfig:
    """The training objective: EDM pretraining ("edm"), Easy Consistency Tuning ("ect"), ECT with a
    variance-reduced r-point ("sct"), continuous-time consistency ("scm"), and the baselines consistency
    training from scratch ("ict", iCT's schedule) and distillation ("cd")."""
    method: str = "edm"
    P_mean: float = -1.2                    # ln σ ~ N(P_mean, P_std²)
    P_std: float = 1.2
    q: float = 2.0                          # ECT mapping function: Δt/t = n(t)/q^(s+1)
    k: float = 8.0
    b: float = 1.0
    stages: int = 8                         # stage_iters = ceil(steps / stages) unless set
    stage_iters: int = 0
    c: float = 0.0                          # pseudo-Huber constant on the per-sample pixel sum
    weighting: str = "inv_dt"               # "inv_dt": 1/(t − r); "snr": 1/t² + 1/σd²
    ict_s0: int = 10                        # iCT: discretisation levels double from s0 to s1
    ict_s1: int = 1280
    ict_total_steps: int = 0                # iCT curriculum length K (0: the run's steps; frozen at creation)
    cd_solver: str = "heun"                 # CD: the teacher's ODE step from t to r ("heun" | "euler")
    sct_refs: int = 512                     # SCT: training images per iteration in the E[x0 | x_t] estimate
    dt_floor: float = 0.0                   # > 0: Δt/t >= n(t)·dt_floor at every stage (TCM: 0.001)
    tcm_stage: int = 0                      # TCM: the ECT stage of its r, held (stage 1's last)
    tcm_df: float = 0.01                    # TCM: ln t ~ Student-t(df)(P_mean, P_std) truncated to [ln t', ln 80]
    tcm_boundary: float = 0.25              # TCM: share of each batch at t = t' (the boundary rows) ...
    tcm_w_boundary: float = 0.1             # ... and the weight of their mean loss beside the others' mean
    cmt_steps: int = 9                      # CMT: DPM-Solver++(2M) levels (= NFE) of the teacher's trajectories
    scm_warmup: int = 0                     # sCM: tangent warm-up iterations (0: a tenth of the run, frozen at creation)
    scm_c: float = 0.1                      # sCM: tangent normalisation g/(‖g‖ + c)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"                      # "adam" | "radam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0                   # linear lr ramp from 0
    lr_ref_steps: int = 0                   # > 0: inverse-sqrt decay lr/√(max(step/ref, 1))


@dataclass(frozen=True)
class EMAConfig:
    kind: str = "power"                     # "power" (EDM2, length ∝ run) | "fixed"
    sigma_rel: float = 0.05
    beta: float = 0.9999


@dataclass(frozen=True)
class SampleConfig:
    heun_steps: int = 18                    # teacher sampler: EDM Heun, 2N − 1 NFE
    t_max: float = 80.0
    mid_ts: tuple[float, ...] = (0.821,)    # 2-step consistency sampler [t_max, *mid_ts]
    gamma: float = 1.0                      # its re-noising: 1 fresh noise (Song et al.), < 1 keeps some of x's own (CTM)
    grid: int = 64                          # images in the interval sample grids


@dataclass(frozen=True)
class EvalConfig:
    """In-loop evaluation: every `every_kimg` thousand training images (0: off) and at the end, `n`
    samples on seeds 0..n-1 from the EMA weights ("ema") or both ("both": also the online weights),
    scored with `metric` ("classifier" | "inception"): 1 and 2 consistency steps at the stored mid
    time for a tuning run, Heun at sample.heun_steps for pretraining. Rows go to metrics.jsonl."""
    every_kimg: float = 0.0
    n: int = 1000
    metric: str = "classifier"
    weights: str = "ema"


@dataclass(frozen=True)
class EngineConfig:
    """How a run executes, not what it computes; may change when a run is continued."""
    precision: str = "auto"                 # "auto" (bf16 on GPUs that have it, else fp32) | "fp32" | "bf16" | "fp16"
    micro_batch: int = 0                    # > 0: per-process chunks of this size, gradients accumulated
    compile: bool = False                   # torch.compile the network (opt-in)
    channels_last: bool = False             # NHWC memory format (faster convolutions on recent GPUs)
    tf32: bool = True                       # TF32 matmuls/convolutions on Ampere+ GPUs
    tensorboard: str = "auto"               # "auto" (on when the tensorboard package is installed) | "on" | "off"


def kind_of(method: str) -> str:
    """A run's kind follows its loss.method: "pretrain" (a diffusion model) for EDM's objective, "tune"
    (a consistency model) for every other."""
    return "pretrain" if method == "edm" else "tune"


@dataclass(frozen=True)
class RunConfig:
    preset: str = "fmnist"
    data: str = "fashion-mnist"
    teacher: str = ""                       # tune: run folder or weights file it starts from
    batch: int = 128
    steps: int = 1000                       # optimizer steps (iterations) of the run
    seed: int = 0
    ckpt_every: int = 500
    sample_every: int = 1000
    log_every: int = 50
    keep_ckpts: int = 3
    max_nonfinite: int = 20                 # consecutive skipped steps before the run stops
    net: NetConfig = field(default_factory=NetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def kind(self) -> str:
        """"pretrain" or "tune", from loss.method (`kind_of`); config.json records it for its readers."""
        return kind_of(self.loss.method)

    @property
    def stage_length(self) -> int:
        """Iterations per ECT stage in effect: `loss.stage_iters` (fixed when the run is created), or,
        while it is 0, the run split into `loss.stages` stages."""
        return self.loss.stage_iters or max(1, math.ceil(self.steps / self.loss.stages))

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The config of a dict as `to_json` writes it; a recorded "kind" must agree with loss.method."""
        if not isinstance(d, dict):
            raise EctuneError(f"config section 'root' must be an object, got {type(d).__name__}")
        kind = d.get("kind")
        cfg = _build(cls, {k: v for k, v in d.items() if k != "kind"}, "")
        if kind is not None and kind != cfg.kind:
            raise EctuneError(f"config kind {kind!r} disagrees with its loss.method {cfg.loss.method!r} (a "
                              f"{cfg.kind} method); fix one of them")
        _check_values(cfg)
        return cfg


def read_config(path) -> RunConfig:
    """The RunConfig saved as JSON at `path` (a run's config.json); EctuneError if it cannot be used."""
    try:
        return RunConfig.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, RecursionError) as e:     # JSON and UTF-8 errors are ValueErrors
        raise EctuneError(f"{path} is not a readable ectune config ({type(e).__name__}: {e})") from None


# Smallest allowed value of the numeric fields that would otherwise fail deep inside a run.
_AT_LEAST = {"batch": 1, "steps": 1, "ckpt_every": 1, "sample_every": 1, "log_every": 1, "keep_ckpts": 0,
             "max_nonfinite": 1, "net.model_channels": 1, "net.channel_mult_emb": 1, "net.num_blocks": 1,
             "net.img_resolution": 1, "net.in_channels": 1, "net.label_dim": 0, "loss.stages": 1,
             "loss.stage_iters": 0, "loss.sct_refs": 0, "loss.tcm_stage": 0, "loss.dt_floor": 0, "loss.tcm_w_boundary": 0,
             "loss.cmt_steps": 2, "loss.scm_warmup": 0, "loss.scm_c": 0, "net.truncate_t": 0, "optim.lr": 0, "optim.warmup_steps": 0, "optim.lr_ref_steps": 0,
             "sample.heun_steps": 1, "sample.grid": 1, "eval.every_kimg": 0, "eval.n": 2}


def _check_values(cfg: RunConfig) -> None:
    """Refuse values no run can use (a zero cadence, an empty network, ...) before anything is written."""
    for key, low in _AT_LEAST.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if value < low:
            raise EctuneError(f"config {key} must be >= {low}, got {value}")
    n, e = cfg.net, cfg.ema
    if not n.channel_mult or min(n.channel_mult) < 1:
        raise EctuneError(f"config net.channel_mult must be a non-empty list of ints >= 1, got {n.channel_mult}")
    if not (0 <= n.dropout < 1 and n.sigma_data > 0):
        raise EctuneError(f"config needs 0 <= net.dropout < 1 and net.sigma_data > 0, got {n.dropout}, {n.sigma_data}")
    _check_net(n)
    if not 0 <= cfg.sample.gamma <= 1:
        raise EctuneError(f"config sample.gamma must be in [0, 1] (1: fresh noise at every step), got {cfg.sample.gamma}")
    if not (0 <= cfg.loss.tcm_boundary < 1 and cfg.loss.tcm_df > 0):
        raise EctuneError(f"config needs 0 <= loss.tcm_boundary < 1 and loss.tcm_df > 0, got "
                          f"{cfg.loss.tcm_boundary}, {cfg.loss.tcm_df}")
    v = cfg.eval
    if v.metric not in ("classifier", "inception") or v.weights not in ("ema", "both") or \
            cfg.engine.tensorboard not in ("auto", "on", "off"):
        raise EctuneError(f"config needs eval.metric classifier|inception, eval.weights ema|both and "
                          f"engine.tensorboard auto|on|off, got {v.metric!r}, {v.weights!r}, {cfg.engine.tensorboard!r}")
    if e.kind not in ("power", "fixed") or (e.kind == "power" and not 0 < e.sigma_rel < 0.28) or not 0 <= e.beta <= 1:
        raise EctuneError(f"config ema must be kind=power with 0 < sigma_rel < 0.28 or kind=fixed with "
                          f"0 <= beta <= 1, got kind={e.kind!r}, sigma_rel={e.sigma_rel}, beta={e.beta}")


def _check_net(n: NetConfig) -> None:
    """Architecture-specific limits of the network fields."""
    if n.arch not in ("ddpmpp", "edm2"):
        raise EctuneError(f"config net.arch must be 'ddpmpp' or 'edm2', got {n.arch!r}")
    if min(n.channel_mult_noise, n.dropout_res, n.logvar_channels) < 0 or not 0 <= n.eval_sigma_min < 1:
        raise EctuneError("config net.channel_mult_noise, net.dropout_res and net.logvar_channels must be >= 0 "
                          f"and 0 <= net.eval_sigma_min < 1, got {n.channel_mult_noise}, {n.dropout_res}, "
                          f"{n.logvar_channels}, {n.eval_sigma_min}")
    if n.arch == "ddpmpp" and (n.channel_mult_noise != 1 or n.dropout_res or n.logvar_channels):
        raise EctuneError("config net.channel_mult_noise, net.dropout_res and net.logvar_channels are EDM2 "
                          "settings; set net.arch=edm2 or leave them at 1, 0, 0")
    if n.arch == "edm2" and n.label_dropout:
        raise EctuneError("config net.label_dropout is not part of EDM2's network; leave it at 0 for net.arch=edm2")


def _build(cls, d, prefix):
    if not isinstance(d, dict):
        raise EctuneError(f"config section {prefix or 'root'!r} must be an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise EctuneError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}; "
                          f"valid keys: {sorted(prefix + n for n in names)}")
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value, hint, key):
    """Check/convert a JSON or command-line value to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise EctuneError(f"config {key} expects a list, got {value!r}")
        elems = typing.get_args(hint)
        if elems[-1] is not Ellipsis and len(value) != len(elems):
            raise EctuneError(f"config {key} expects {len(elems)} values, got {len(value)}")
        return tuple(_coerce(v, elems[0], key) for v in value)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError, OverflowError):   # OverflowError: an int too large for a float
        pass
    else:
        raise EctuneError(f"config {key} has unsupported type {hint}")
    raise EctuneError(f"config {key} expects {hint.__name__}, got {value!r}")


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.field=value` strings (e.g. `loss.q=4`, `optim.lr=2e-4`, `batch=64`)."""
    d = dataclasses.asdict(cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise EctuneError(f"override {item!r} must look like section.field=value, e.g. loss.q=4")
        if key.strip() == "kind":
            raise EctuneError(f"--set {item.strip()} is refused: a run's kind follows its loss.method (edm: "
                              "pretrain, the consistency methods: tune); use `ectune pretrain` to train a "
                              "diffusion model and `ectune tune` to train a consistency model")
        *path, leaf = key.strip().split(".")
        node = d
        for part in path:
            if not isinstance(node.get(part), dict):
                raise EctuneError(f"unknown config section {part!r} in {item!r}; run `ectune presets` to see keys")
            node = node[part]
        if leaf not in node or isinstance(node[leaf], dict):
            raise EctuneError(f"unknown config key {key!r}; run `ectune presets --show NAME` to see keys")
        node[leaf] = value.strip()
    return RunConfig.from_dict(d)
