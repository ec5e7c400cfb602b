"""Training losses. Each calls only a denoiser D(x, σ) and returns a per-sample loss of shape (B,).

All losses are deterministic given their inputs: noise levels and noise are arguments.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.autograd import forward_ad

from .errors import EctuneError
from .rng import replayed, rng_state

Denoiser = Callable[..., torch.Tensor]


def _call(D: Denoiser, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, **kw):
    """D(x, σ), with the labels only when there are any: any two-argument D(x, sigma) works."""
    return D(x, sigma, **kw) if class_labels is None else D(x, sigma, class_labels, **kw)


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's loss weight λ(σ) = (σ² + σd²)/(σ·σd)² (Karras et al. 2022, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def _sum_pixels(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).sum(dim=1)


def edm_loss(D: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, *,
             sigma_data: float = 0.5, class_labels=None) -> torch.Tensor:
    """EDM denoising loss (ECT.md §3): λ(σ)·‖D(x0 + σε, σ) − x0‖², summed over pixels. Returns (B,)."""
    denoised = _call(D, x0 + _bcast(sigma) * noise, sigma, class_labels)
    return edm_weight(sigma, sigma_data) * _sum_pixels((denoised - x0) ** 2)


def edm2_loss(D: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, *,
              sigma_data: float = 0.5, class_labels=None) -> torch.Tensor:
    """EDM2's loss with learned uncertainty u(σ) (Karras et al. 2024, Eq. 21), summed over pixels:
    λ(σ)/e^u·‖D(x0 + σε, σ) − x0‖² + N·u for N pixels. D must return (D_x, u) with return_logvar."""
    denoised, logvar = _call(D, x0 + _bcast(sigma) * noise, sigma, class_labels, return_logvar=True)
    n = x0[0].numel()
    return edm_weight(sigma, sigma_data) / logvar.exp() * _sum_pixels((denoised - x0) ** 2) + n * logvar


def pseudo_huber(sq_dist: torch.Tensor, c: float) -> torch.Tensor:
    """√(d + c²) − c on the per-sample squared L2 distance d (ECT §4.6; c = 0 is the plain L2 norm).

    With c = 0 the gradient of √d is infinite at d = 0 (e.g. a CD student equal to its teacher), so d
    is floored at 1e-30 there: the value changes by at most 1e-15 and the gradient stays finite.
    """
    if c == 0:
        return sq_dist.clamp_min(1e-30).sqrt()
    return (sq_dist + c * c).sqrt() - c


def ect_weight(t: torch.Tensor, r: torch.Tensor, weighting: str, sigma_data: float = 0.5) -> torch.Tensor:
    """ECT time weighting (§4.7): "inv_dt" w = 1/(t − r) (CIFAR-10), "snr" w = 1/t² + 1/σd² (ImageNet-64)."""
    if weighting == "inv_dt":
        return 1 / (t - r)
    if weighting == "snr":
        return 1 / t**2 + 1 / sigma_data**2
    raise ValueError(f"unknown ECT weighting {weighting!r}; use 'inv_dt' or 'snr'")


def consistency_pair(D: Denoiser, x_t, t, x_r, r, *, class_labels=None):
    """Online prediction D(x_t, t) with gradients and its stop-gradient target at r (ECT §4.4–4.5).

    The target is D(x_r, r) from the same current weights under no_grad, evaluated with the *same*
    dropout masks as the online branch (replayed from the RNG state the online pass started from;
    afterwards the stream goes on from where the online pass left it), and x_r itself where r = 0 —
    there D(x, 0) = x by the boundary condition, so D is never called at a noise level of 0.
    Returns (online, target), both (B, C, H, W).
    """
    start = rng_state(x_t.device)
    online = _call(D, x_t, t, class_labels)
    positive = r > 0
    with torch.no_grad(), replayed(x_t.device, start):
        r_safe = torch.where(positive, r, t)                 # rows with r = 0 are discarded below
        target = _call(D, x_r, r_safe, class_labels)
        target = torch.where(_bcast(positive), target.to(online.dtype), x_r.to(online.dtype))
    return online, target.detach()


def ect_loss(D: Denoiser, x0: torch.Tensor, t: torch.Tensor, r: torch.Tensor, noise: torch.Tensor, *,
             c: float = 0.0, weighting: str = "inv_dt", sigma_data: float = 0.5,
             class_labels=None) -> torch.Tensor:
    """Easy Consistency Tuning loss (ECT.md §4, steps 3–7). Returns w(t, r)·d per sample, (B,).

    One shared noise ε gives x_t = x0 + t·ε and x_r = x0 + r·ε; d = √(‖D(x_t,t) − sg[D(x_r,r)]‖² + c²) − c
    with the squared norm summed over all pixels.
    """
    if not bool((r < t).all()) or not bool((r >= 0).all()):
        raise ValueError("ect_loss needs 0 <= r < t for every sample")
    x_t = x0 + _bcast(t) * noise
    x_r = x0 + _bcast(r) * noise
    online, target = consistency_pair(D, x_t, t, x_r, r, class_labels=class_labels)
    d = pseudo_huber(_sum_pixels((online - target) ** 2), c)
    return ect_weight(t, r, weighting, sigma_data) * d


@torch.no_grad()
def stf_clean_estimate(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, refs: torch.Tensor, *,
                       labels: torch.Tensor | None = None, ref_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The "stable target field" estimate of E[x0 | x_t] (Xu et al. 2023), (B, C, H, W).

    x̂0 = Σ_j w_j x⁽ʲ⁾ over the references {x0 (the sample's own), refs_1 … refs_K} with
    w = softmax_j(−‖x_t − x⁽ʲ⁾‖²/2t²): the posterior mean of x0 given x_t = x0 + t·ε when x0 is drawn
    from those references. With `labels`, only references of the sample's own class count. float64.
    """
    xt, own = x_t.flatten(1).double(), x0.flatten(1).double()                 # (B, D)
    pool = refs.flatten(1).double()                                             # (K, D)
    t2 = 2 * t.double().reshape(-1, 1) ** 2                                     # (B, 1)
    d_own = (xt - own).pow(2).sum(1, keepdim=True)                              # (B, 1)
    # ‖a‖² + ‖b‖² − 2a·b in float64: its rounding (~1e-13 here) is far below what the weights resolve
    d_ref = (xt.pow(2).sum(1, keepdim=True) + pool.pow(2).sum(1) - 2 * xt @ pool.T).clamp_min(0)   # (B, K)
    logits = torch.cat([-d_own, -d_ref], dim=1) / t2                            # (B, 1 + K)
    if labels is not None and ref_labels is not None:
        other = labels.reshape(-1, 1) != ref_labels.reshape(1, -1)
        logits[:, 1:] = logits[:, 1:].masked_fill(other, float("-inf"))
    w = logits.softmax(dim=1)
    x0_hat = w[:, :1] * own + w[:, 1:] @ pool
    return x0_hat.reshape(x_t.shape).to(x_t.dtype)


def sct_loss(D: Denoiser, x0: torch.Tensor, t: torch.Tensor, r: torch.Tensor, noise: torch.Tensor,
             refs: torch.Tensor, *, ref_labels=None, c: float = 0.0, weighting: str = "inv_dt",
             sigma_data: float = 0.5, class_labels=None) -> torch.Tensor:
    """ECT with a variance-reduced r-point (SCT, Wang, Geng & Li 2024, on top of ECT), (B,).

    x_r = x_t − (t − r)·(x_t − x̂0)/t, one PF-ODE Euler step from x_t with the clean estimate x̂0 of
    :func:`stf_clean_estimate` instead of the single sample x0 (one-hot weights give ECT's x0 + r·ε).
    Where r = 0 the target is x_r = x̂0. Distance and weighting as in :func:`ect_loss`.
    """
    if not bool((r < t).all()) or not bool((r >= 0).all()):
        raise ValueError("sct_loss needs 0 <= r < t for every sample")
    x_t = x0 + _bcast(t) * noise
    labels = class_labels if class_labels is None or class_labels.ndim == 1 else class_labels.argmax(1)
    x0_hat = stf_clean_estimate(x_t, t, x0, refs, labels=labels, ref_labels=ref_labels)
    x_r = x_t - _bcast((t - r) / t) * (x_t - x0_hat)
    online, target = consistency_pair(D, x_t, t, x_r, r, class_labels=class_labels)
    d = pseudo_huber(_sum_pixels((online - target) ** 2), c)
    return ect_weight(t, r, weighting, sigma_data) * d


@torch.no_grad()
def teacher_ode_step(teacher: Denoiser, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, *,
                     solver: str = "heun", class_labels=None) -> torch.Tensor:
    """One PF-ODE step of a frozen diffusion teacher from (x_t, t) down to r, per sample (CD's x_r).

    Euler: x_r = x_t + (r − t)·d_t with d_t = (x_t − T(x_t, t))/t; Heun adds EDM's correction with d at
    (x_r, r) where r > 0. Where r = 0 both give T(x_t, t), so the teacher is never called at σ = 0.
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown CD solver {solver!r}; use 'euler' or 'heun'")
    d_t = (x_t - _call(teacher, x_t, t, class_labels)) / _bcast(t)
    x_r = x_t + _bcast(r - t) * d_t
    if solver == "euler":
        return x_r
    positive = r > 0
    r_safe = torch.where(positive, r, t)                     # rows with r = 0 keep the Euler result
    d_r = (x_r - _call(teacher, x_r, r_safe, class_labels)) / _bcast(r_safe)
    heun = x_t + _bcast(r - t) * (d_t + d_r) / 2
    return torch.where(_bcast(positive), heun, x_r)


def cd_loss(D: Denoiser, teacher: Denoiser, x0: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
            noise: torch.Tensor, *, c: float = 0.0, weighting: str = "inv_dt", sigma_data: float = 0.5,
            solver: str = "heun", class_labels=None) -> torch.Tensor:
    """Consistency distillation (Song et al. 2023) with ECT's distance and weighting, (B,).

    Identical to `ect_loss` except for the r-point: x_r is one teacher ODE step from x_t
    (`teacher_ode_step`) instead of x0 + r·ε with the shared noise. The target is the stop-gradient
    student at (x_r, r), or x_r itself where r = 0.
    """
    if not bool((r < t).all()) or not bool((r >= 0).all()):
        raise ValueError("cd_loss needs 0 <= r < t for every sample")
    x_t = x0 + _bcast(t) * noise
    x_r = teacher_ode_step(teacher, x_t, t, r, solver=solver, class_labels=class_labels).to(x_t.dtype)
    online, target = consistency_pair(D, x_t, t, x_r, r, class_labels=class_labels)
    d = pseudo_huber(_sum_pixels((online - target) ** 2), c)
    return ect_weight(t, r, weighting, sigma_data) * d


def cmt_trajectories(teacher: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *,
                     class_labels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's DPM-Solver++(2M) trajectories from σ_0·noise on `sigmas` (positive levels, then 0):
    (states (G, M, C, H, W) at the first M = len(sigmas) − 2 levels — every positive level but the
    last, σ_min, where the consistency model is the identity — and the endpoints (G, C, H, W)). float64."""
    from .sampling import sample_dpmpp_2m
    states: list[torch.Tensor] = []
    end = sample_dpmpp_2m(teacher, noise.double() * float(sigmas[0]), sigmas.tolist(), class_labels=class_labels,
                          states=states)
    return torch.stack(states[:len(sigmas) - 2], dim=1), end.double()


def cmt_loss(D: Denoiser, teacher: Denoiser, t: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, *,
             c: float = 0.0, class_labels=None) -> torch.Tensor:
    """Consistency mid-training (CMT, Hu, Lai, Mitsufuji & Ermon 2025), (B,): the student maps every
    point of a teacher's ODE trajectory straight to the trajectory's end, d(D(x̂_{t_i}, t_i), x̂_0),
    with ECT's distance √(‖·‖² + c²) − c on the pixel sum and equal weight for every point.

    The B rows are B / M trajectories of M = len(sigmas) − 2 consecutive rows: trajectory g starts from
    noise[g·M], of class class_labels[g·M] (for all its rows); row g·M + i is its state at
    t_i = sigmas[i], which `t` must hold. The trajectories cost (B / M)·(M + 1) teacher calls: about one per row."""
    m = len(sigmas) - 2
    if m < 1 or len(t) % m or not torch.equal(t.double().reshape(-1, m), sigmas[:m].to(t).double().expand(len(t) // m, m)):
        raise EctuneError(f"CMT rows come in trajectories of {m} points at the levels {sigmas[:m].tolist()}: "
                          f"use a batch (per process and micro-batch) that is a multiple of {m}, or set "
                          "loss.cmt_steps so that (loss.cmt_steps − 1) divides it")
    labels = None if class_labels is None else class_labels[::m]
    with torch.no_grad():
        states, end = cmt_trajectories(teacher, noise[::m], sigmas, class_labels=labels)
    x_t = states.reshape(-1, *noise.shape[1:]).to(noise.dtype)
    online = _call(D, x_t, t, None if labels is None else labels.repeat_interleave(m, dim=0))
    target = end.to(online.dtype).repeat_interleave(m, dim=0)
    return pseudo_huber(_sum_pixels((online - target) ** 2), c)


def trigflow_consistency(D: Denoiser, x_t: torch.Tensor, s: torch.Tensor, *, sigma_data: float = 0.5,
                         class_labels=None) -> torch.Tensor:
    """The consistency function of TrigFlow time s (Lu & Song 2024) through an EDM denoiser, (B, C, H, W).

    With x_t = cos s·x0 + sin s·σd·ε the EDM point is x_t / cos s = x0 + σε at σ = σd·tan s, and EDM's
    preconditioning (c_skip = cos²s, c_out = σd·sin s, c_in = cos s/σd there) makes
    f(x_t, s) = D(x_t / cos s, σd·tan s) = cos s·x_t − σd·sin s·F(x_t/σd, s): TrigFlow's form, with its
    network F = −F_EDM and the time embedding c_noise = ln(σd·tan s)/4. Differentiable in x_t and s.
    """
    return _call(D, x_t / _bcast(torch.cos(s)), sigma_data * torch.tan(s), class_labels)


def trigflow_network(x_t: torch.Tensor, f: torch.Tensor, s: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """TrigFlow's network output F from the consistency function's value f = cos s·x_t − σd·sin s·F."""
    return (_bcast(torch.cos(s)) * x_t - f) / (sigma_data * _bcast(torch.sin(s)))


@functools.cache
def _load_forward_ad() -> None:
    """Import what torch's forward-mode AD loads on first use, without its TorchScript deprecation
    warning (torch's own, from its JVP decompositions; not something a user can act on)."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401


@torch.no_grad()
def scm_tangent(D: Denoiser, x_t: torch.Tensor, s: torch.Tensor, v: torch.Tensor, *, warmup: float = 1.0,
                sigma_data: float = 0.5, class_labels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """sCM's tangent at TrigFlow time s along the velocity v = dx_t/ds, without normalisation: (F, g).

    F = (cos s·x_t − f)/(σd·sin s) with f = :func:`trigflow_consistency`, and g = cos s·df/ds where
    df/ds = −cos s·(σd·F − v) − sin s·(x_t + σd·dF/ds) is f's total derivative along v (one JVP of D
    in x_t and s), its second term scaled by `warmup` (sCM's tangent warm-up). g = 0 for a consistency
    function of the ODE whose velocity v is. No gradients; D's random draws (dropout) as the caller's RNG gives.
    """
    cos = _bcast(torch.cos(s))
    _load_forward_ad()
    with forward_ad.dual_level():
        out = trigflow_consistency(D, forward_ad.make_dual(x_t, v), forward_ad.make_dual(s, torch.ones_like(s)),
                                   sigma_data=sigma_data, class_labels=class_labels)
        f_s, df_ds = forward_ad.unpack_dual(out)
    F = trigflow_network(x_t, f_s, s, sigma_data)
    first = -cos * (sigma_data * F - v)                                         # the part without dF/ds
    return F, cos * (first + warmup * (df_ds - first))


def scm_loss(D: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, *, warmup: float = 1.0,
             c: float = 0.1, sigma_data: float = 0.5, class_labels=None) -> torch.Tensor:
    """Continuous-time consistency training (sCT; Lu & Song 2024, TrigFlow), (B,), through an EDM D.

    s = arctan(σ/σd), x_t = cos s·x0 + sin s·σd·ε and the training velocity v = dx_t/ds =
    cos s·σd·ε − sin s·x0. The tangent g of :func:`scm_tangent` (with the online pass's dropout masks)
    is normalised to g/(‖g‖ + c) per sample. The loss is ‖F_θ − sg[F_θ] − g‖² summed over pixels, with
    F_θ = (cos s·x_t − f_θ)/(σd·sin s): its value is ‖g‖², its gradient −2·gᵀ∂F_θ/∂θ (sCM's objective
    without its adaptive weighting).
    """
    s = torch.atan(sigma.double() / sigma_data).to(x0.dtype)                  # (B,) TrigFlow time
    cos, sin = _bcast(torch.cos(s)), _bcast(torch.sin(s))
    x_t = cos * x0 + sin * sigma_data * noise
    v = cos * sigma_data * noise - sin * x0
    start = rng_state(x0.device)
    F_online = trigflow_network(x_t, trigflow_consistency(D, x_t, s, sigma_data=sigma_data,
                                                          class_labels=class_labels), s, sigma_data)
    with replayed(x0.device, start):
        F_minus, g = scm_tangent(D, x_t, s, v, warmup=warmup, sigma_data=sigma_data, class_labels=class_labels)
    g = g / (_bcast(_sum_pixels(g ** 2).sqrt()) + c)
    return _sum_pixels((F_online - F_minus - g) ** 2)
