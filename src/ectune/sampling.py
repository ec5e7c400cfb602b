"""Samplers over an explicit noise-level grid, and `Sampler`, the frozen description of one.

Each sampler is a pure function `sample_x(D, x, sigmas, ...)` (k-diffusion's signature) that calls only
a denoiser D(x, σ): `sigmas` is the grid σ_0 > σ_1 > … > σ_N = 0 and `x` the starting point, unit
noise already scaled by σ_0 (B, C, H, W) float64. Step arithmetic runs in float64 (ECT.md §5); the
returned samples are float32. `heun_sampler`, `dpmpp2m_sampler` and `consistency_sampler` are the same
samplers on their usual grids, taking unit noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from .errors import EctuneError
from .schedules import karras_sigmas

Denoiser = Callable[..., torch.Tensor]


def _denoise(D: Denoiser, x: torch.Tensor, sigma: float, class_labels) -> torch.Tensor:
    s = torch.full((x.shape[0],), float(sigma), dtype=torch.float64, device=x.device)
    out = D(x, s) if class_labels is None else D(x, s, class_labels)   # any two-argument D(x, sigma) works
    return out.to(torch.float64)


def check_times(ts: Sequence[float], what: str = "consistency times") -> list[float]:
    """`ts` as floats; refused (EctuneError) unless there is one or more, finite, positive and strictly
    decreasing. `what` names them in the message (e.g. "--ts")."""
    ts = [float(t) for t in ts]
    if not ts or not all(math.isfinite(t) and t > 0 for t in ts) or any(a <= b for a, b in pairwise(ts)):
        raise EctuneError(f"{what} must be positive and strictly decreasing finite times (e.g. 80 1.5), got {ts}")
    return ts


# --- the samplers, on an explicit grid
@torch.no_grad()
def sample_heun(D: Denoiser, x: torch.Tensor, sigmas: Sequence[float], *, class_labels=None) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): Heun's method on the PF-ODE.

    One Euler step per interval, corrected wherever σ_{i+1} > 0: NFE = 2N − 1 on a grid ending in 0.
    """
    sigmas = [float(s) for s in sigmas]
    for s_cur, s_next in pairwise(sigmas):
        d_cur = (x - _denoise(D, x, s_cur, class_labels)) / s_cur          # dx/dσ at σ_i
        x_next = x + (s_next - s_cur) * d_cur                               # Euler step
        if s_next > 0:                                                      # Heun correction
            d_next = (x_next - _denoise(D, x_next, s_next, class_labels)) / s_next
            x_next = x + (s_next - s_cur) * (d_cur + d_next) / 2
        x = x_next
    return x.to(torch.float32)


@torch.no_grad()
def sample_dpmpp_2m(D: Denoiser, x: torch.Tensor, sigmas: Sequence[float], *, class_labels=None,
                    states: list | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep second order in data prediction.

    On EDM's PF-ODE x_σ = x0 + σε, so α = 1, λ = −log σ and h_i = λ_{i+1} − λ_i = log(σ_i / σ_{i+1}).
    With D_i = D(x_i, σ_i), each step σ_i → σ_{i+1} is

        x_{i+1} = (σ_{i+1} / σ_i)·x_i + (1 − e^{−h_i})·D̂_i,

    where D̂_0 = D_0 (first order, the DDIM step) and, later, with r_i = h_{i−1} / h_i,
    D̂_i = (1 + 1/(2 r_i))·D_i − 1/(2 r_i)·D_{i−1}. The last step, to σ = 0, has h = ∞ and
    e^{−h} = 0: it returns the data prediction D(x, σ_{N−1}) itself. One D call per positive level.
    A list `states` receives x_i (float64) at every positive level σ_i: the trajectory (CMT's inputs).
    """
    d_prev, h_prev = None, None
    for s_cur, s_next in pairwise(float(s) for s in sigmas):
        if states is not None:
            states.append(x.to(torch.float64))
        d = _denoise(D, x, s_cur, class_labels)                            # D_i
        if s_next == 0:                                                     # h = ∞: x = D_i
            x = d
            break
        h = math.log(s_cur / s_next)
        d_hat = d
        if d_prev is not None:                                              # second-order correction
            r = h_prev / h
            d_hat = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
        x = (s_next / s_cur) * x - math.expm1(-h) * d_hat
        d_prev, h_prev = d, h
    return x.to(torch.float32)


def check_gamma(gamma: float) -> float:
    """γ of consistency sampling as a float in [0, 1]; refused (EctuneError) otherwise."""
    gamma = float(gamma)
    if not 0 <= gamma <= 1:
        raise EctuneError(f"gamma (--gamma, sample.gamma) must be in [0, 1] (1: fresh noise at every step), got {gamma}")
    return gamma


@torch.no_grad()
def sample_consistency(D: Denoiser, x: torch.Tensor, sigmas: Sequence[float], *,
                       step_noise: Sequence[torch.Tensor] | None = None, generator: torch.Generator | None = None,
                       class_labels=None, gamma: float = 1.0) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) on times t_0 > … > t_{k−1},
    sigmas = [t_0, …, t_{k−1}, 0], with CTM's γ (Kim et al. 2023, "γ-sampling").

    For each i: x̂ ← D(x, t_i), then, if another time follows, x ← x̂ + t_{i+1}·(√(1 − γ²)·ε̂ + γ·ε_i)
    with ε̂ = (x − x̂)/t_i the noise the model sees in x, and ε_i from `step_noise[i]` if given, else
    drawn like x from `generator`. γ = 1 is Song et al.'s x̂ + t_{i+1}·ε_i (computed as exactly that);
    γ = 0 is a deterministic DDIM-style step to t_{i+1}. 1 step is D(80·z, 80) whatever γ.
    """
    gamma = check_gamma(gamma)
    keep = math.sqrt(1 - gamma * gamma)
    for i, (t, t_next) in enumerate(pairwise(float(s) for s in sigmas)):
        x_hat = _denoise(D, x, t, class_labels)
        if t_next > 0:
            eps = step_noise[i] if step_noise is not None else torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype)
            eps = eps.to(torch.float64)
            if gamma != 1:
                eps = keep * (x.to(torch.float64) - x_hat) / t + gamma * eps
            x_hat = x_hat + t_next * eps
        x = x_hat
    return x.to(torch.float32)


_SAMPLERS = {"consistency": sample_consistency, "heun": sample_heun, "dpmpp2m": sample_dpmpp_2m}


# --- the samplers on their usual grids, from unit noise
def heun_sampler(D: Denoiser, noise: torch.Tensor, *, num_steps: int = 18, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, class_labels=None) -> torch.Tensor:
    """`sample_heun` on the Karras grid of `num_steps` levels (then 0) from unit noise: NFE 2N − 1 (18 → 35)."""
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    return sample_heun(D, noise.to(torch.float64) * sigmas[0], sigmas, class_labels=class_labels)


def heun_nfe(num_steps: int) -> int:
    """Network evaluations of Heun with `num_steps` positive noise levels: 2N − 1."""
    return 2 * num_steps - 1


def dpmpp2m_sampler(D: Denoiser, noise: torch.Tensor, *, num_steps: int = 35, sigma_min: float = 0.002,
                    sigma_max: float = 80.0, rho: float = 7.0, class_labels=None) -> torch.Tensor:
    """`sample_dpmpp_2m` on the Karras grid of `num_steps` levels (then 0) from unit noise: NFE = N
    (any N ≥ 1; N = 1 is D(σmax·z, σmax))."""
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    return sample_dpmpp_2m(D, noise.to(torch.float64) * sigmas[0], sigmas, class_labels=class_labels)


def dpmpp_nfe(num_steps: int) -> int:
    """Network evaluations of DPM-Solver++(2M) with `num_steps` positive noise levels: N."""
    return num_steps


def consistency_sampler(D: Denoiser, noise: torch.Tensor, ts: Sequence[float] = (80.0,), *,
                        generator: torch.Generator | None = None, class_labels=None,
                        step_noise: Sequence[torch.Tensor] | None = None, gamma: float = 1.0) -> torch.Tensor:
    """`sample_consistency` at times `ts` from unit noise; fresh noise like `noise` from `generator`
    unless `step_noise` is given."""
    ts = check_times(ts)
    if step_noise is None:
        step_noise = [torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
                      for _ in ts[1:]]
    return sample_consistency(D, noise.to(torch.float64) * ts[0], [*ts, 0.0], step_noise=step_noise,
                              class_labels=class_labels, gamma=gamma)


def default_consistency_times(steps: int, mid_ts: Sequence[float] = (), t_max: float = 80.0) -> list[float]:
    """Times for a k-step consistency sampler: [t_max, *mid_ts] when k − 1 mid times are given,
    else the first k levels of the Karras grid with k + 1 levels (a reasonable guess; search it)."""
    if steps < 1:
        raise EctuneError(f"steps (--steps) must be >= 1, got {steps}")
    if len(mid_ts) == steps - 1:
        return [t_max, *map(float, mid_ts)]
    return karras_sigmas(steps + 1, sigma_max=t_max, append_zero=False).tolist()[:steps]


# --- the description of a sampler
def check_name(name: str) -> str:
    """`name` if it names a sampler; refused otherwise."""
    if name not in _SAMPLERS:
        raise EctuneError(f"unknown sampler {name!r}; use 'consistency', 'heun' or 'dpmpp2m' (--sampler)")
    return name


def _at_least_one(name: str, flag: str, value: int) -> None:
    if value < 1:
        raise EctuneError(f"{name} ({flag}) must be >= 1, got {value}")


@dataclass(frozen=True)
class Sampler:
    """A sampler and its grid σ_0 > … > σ_N = 0: what `sample_images` runs and what results record.

        Sampler.heun(18)                 # Karras grid, 18 levels: NFE 35
        Sampler.dpmpp2m(35)              # Karras grid, 35 levels: NFE 35
        Sampler.consistency([80, 1.5])   # 2 steps: NFE 2
        Sampler.consistency([80, 3.0], gamma=0.7)   # CTM's γ-sampling
    """
    name: str                       # "consistency", "heun" or "dpmpp2m"
    sigmas: tuple[float, ...]
    gamma: float = 1.0              # consistency only: the re-noising of `sample_consistency`

    def __post_init__(self) -> None:
        check_name(self.name)
        object.__setattr__(self, "gamma", check_gamma(self.gamma))
        if self.name != "consistency" and self.gamma != 1:
            raise EctuneError(f"gamma (--gamma) belongs to consistency sampling, not to {self.name}; drop it")
        levels = check_times(self.sigmas[:-1], f"the noise levels of {self.name}")
        if self.sigmas[-1] != 0:
            raise EctuneError(f"the grid of {self.name} must end in 0, got {list(self.sigmas)}")
        object.__setattr__(self, "sigmas", (*levels, 0.0))

    @classmethod
    def heun(cls, num_steps: int = 18) -> Sampler:
        """Heun on the Karras grid of `num_steps` levels."""
        _at_least_one("num_steps", "--num-steps", num_steps)
        return cls("heun", tuple(karras_sigmas(num_steps).tolist()))

    @classmethod
    def dpmpp2m(cls, nfe: int = 35) -> Sampler:
        """DPM-Solver++(2M) on the Karras grid of `nfe` levels (one network call each)."""
        _at_least_one("dpm_nfe", "--nfe", nfe)
        return cls("dpmpp2m", tuple(karras_sigmas(nfe).tolist()))

    @classmethod
    def consistency(cls, ts: Sequence[float] = (80.0,), gamma: float = 1.0) -> Sampler:
        """Consistency sampling at times `ts` (t_0 > … > t_{k−1} > 0) with re-noising `gamma` (1 step: unused)."""
        ts, gamma = check_times(ts), check_gamma(gamma)
        return cls("consistency", (*ts, 0.0), gamma if len(ts) > 1 else 1.0)

    @property
    def steps(self) -> int:
        """Positive noise levels N (Heun, DPM-Solver) or consistency steps k."""
        return len(self.sigmas) - 1

    @property
    def ts(self) -> list[float]:
        """The positive levels: a consistency sampler's times."""
        return list(self.sigmas[:-1])

    @property
    def noises(self) -> int:
        """Unit-noise tensors per sample: the start, and the fresh noise of each later consistency step."""
        return self.steps if self.name == "consistency" else 1

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        return heun_nfe(self.steps) if self.name == "heun" else self.steps

    @property
    def spec(self) -> dict:
        """The sampler as results record it: its name, its parameter (Heun's levels, consistency times) and NFE."""
        if self.name == "heun":
            return {"name": "heun", "num_steps": self.steps, "nfe": self.nfe}
        if self.name == "dpmpp2m":
            return {"name": "dpmpp2m", "nfe": self.nfe}
        return {"name": "consistency", "ts": self.ts, "nfe": self.nfe, **({"gamma": self.gamma} if self.gamma != 1 else {})}

    @property
    def label(self) -> str:
        """A short description for messages, e.g. "heun 18 steps"."""
        return {"heun": f"heun {self.steps} steps", "dpmpp2m": f"dpmpp2m NFE {self.nfe}"}.get(
            self.name, f"consistency ts={[round(t, 4) for t in self.ts]}" + (f" gamma={self.gamma:g}" if self.gamma != 1 else ""))

    def __call__(self, D: Denoiser, noise: torch.Tensor, step_noise: Sequence[torch.Tensor] = (),
                 class_labels=None) -> torch.Tensor:
        """Samples (B, C, H, W) float32 from unit noise (and a consistency sampler's k − 1 fresh noises)."""
        x = noise.to(torch.float64) * self.sigmas[0]
        if self.name == "consistency":
            return sample_consistency(D, x, self.sigmas, step_noise=step_noise, class_labels=class_labels,
                                      gamma=self.gamma)
        return _SAMPLERS[self.name](D, x, self.sigmas, class_labels=class_labels)


# --- samples for seeds
def seeded_noise(seeds: Sequence[int], shape: Sequence[int], count: int = 1, device=None) -> list[torch.Tensor]:
    """`count` unit-Gaussian tensors (len(seeds), *shape), each row drawn from its own seed.

    The first is the starting noise z, the rest the fresh noise of later consistency steps, so one
    seed gives the same image whatever the batch it is drawn in or the number of processes.
    """
    out = [torch.empty(len(seeds), *shape) for _ in range(count)]
    for row, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        for tensor in out:
            tensor[row] = torch.randn(*shape, generator=g)
    return [t.to(device) for t in out]


def seed_labels(seeds: Sequence[int], label_dim: int) -> torch.Tensor | None:
    """Class labels of a conditional model's samples: seed % classes (N,); None for an unconditional one."""
    return torch.tensor(list(seeds)) % label_dim if label_dim else None


def sample_images(D: Denoiser, seeds: Sequence[int], shape: Sequence[int], sampler: Sampler, *,
                  class_labels=None, batch: int = 256, device=None, progress=None) -> torch.Tensor:
    """Samples (N, C, H, W) for `seeds` with `sampler`, `batch` at a time.

    `progress` (e.g. a `progress.Progress` over len(seeds) samples) is advanced after every network
    call by the fraction of a sample that call stands for, so a bar moves within a batch too."""
    _at_least_one("batch", "--batch", batch)
    if len(seeds) == 0:
        raise EctuneError("no seeds to sample; ask for at least one sample (--n 1 or more)")
    if progress is not None:
        D = _counted(D, progress, sampler.nfe)
    chunks = []
    for i in range(0, len(seeds), batch):
        labels = None if class_labels is None else class_labels[i:i + batch].to(device)
        z, *eps = seeded_noise(list(seeds[i:i + batch]), shape, sampler.noises, device)
        chunks.append(sampler(D, z, eps, class_labels=labels).cpu())
    return torch.cat(chunks)


def _counted(D: Denoiser, progress, nfe: int) -> Denoiser:
    """D that advances `progress` by len(x) / nfe samples per call."""
    def counted(x, sigma, *rest, **kw):
        out = D(x, sigma, *rest, **kw)
        progress.update(len(x) / nfe)
        return out
    return counted
