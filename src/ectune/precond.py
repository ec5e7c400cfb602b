"""EDM preconditioning (Karras et al. 2022, Table 1): any network F becomes a denoiser D(x, σ).

    D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))

with c_skip = σd²/(σ²+σd²), c_out = σ·σd/√(σ²+σd²), c_in = 1/√(σ²+σd²), c_noise = ln(σ)/4.
At σ = 0, c_skip = 1 and c_out = 0, so D(x, 0) = x exactly; the network is never evaluated there.

The official ECT code evaluates its CIFAR-10 models (``ECMPrecond``, eval mode only) with c_skip and
c_out shifted by σ_min = 0.003 (:func:`ect_eval_coefficients`); ``eval_sigma_min`` > 0 turns that on
for a model imported from it. ectune's own runs leave it at 0: the same D in training and sampling.

:class:`Truncated` is TCM's denoiser (Lee et al. 2025): a frozen stage-1 consistency model below a
noise level t′ and the network being tuned at and above it.
"""

from __future__ import annotations

import torch
from torch import nn

from .rng import replayed, rng_state


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in) of EDM's Table 1 for noise levels `sigma` (any shape)."""
    s2, d2 = sigma**2, sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    return c_skip, c_out, c_in


def ect_eval_coefficients(sigma: torch.Tensor, sigma_data: float, sigma_min: float):
    """(c_skip, c_out) of official ECT's eval mode: c_skip = σd²/((σ−σmin)² + σd²),
    c_out = (σ−σmin)·σd/√(σ² + σd²); D(x, σmin) = x."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Noise conditioning of EDM: ln(σ)/4 (defined for σ > 0 only)."""
    return sigma.log() / 4


class EDMPrecond(nn.Module):
    """Wrap a raw network `net(x_in, noise_labels, class_labels)` into the EDM denoiser D(x, σ).

    Call as ``D(x, sigma, class_labels=None)``: x (B, C, H, W), sigma (B,) or a scalar,
    class_labels (B,) integer ids or (B, label_dim) one-hot / None. Returns (B, C, H, W) float32.
    Rows with σ = 0 return x itself without evaluating the network on them.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, label_dim: int = 0, eval_sigma_min: float = 0.0):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.label_dim = int(label_dim)
        self.eval_sigma_min = float(eval_sigma_min)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, *,
                return_logvar: bool = False):
        """D(x, σ); with ``return_logvar`` also the network's u(σ) (B,) (EDM2 nets with a logvar head)."""
        x = x.to(torch.float32)                                            # (B, C, H, W)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.reshape(-1).expand(x.shape[0]).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        labels = self._labels(class_labels, x)
        c_skip, c_out, c_in = edm_coefficients(sigma, self.sigma_data)
        if self.eval_sigma_min and not self.training:
            c_skip, c_out = ect_eval_coefficients(sigma, self.sigma_data, self.eval_sigma_min)
        positive = sigma > 0
        safe_sigma = torch.where(positive, sigma, torch.ones_like(sigma))  # ln(0) never reached
        F_x = self.net(c_in * x, c_noise(safe_sigma).reshape(-1), labels).to(torch.float32)
        D_x = torch.where(positive, c_skip * x + c_out * F_x, x)
        return (D_x, self.net.logvar(c_noise(safe_sigma).reshape(-1))) if return_logvar else D_x

    def _labels(self, class_labels, x):
        if self.label_dim == 0:
            return None
        if class_labels is None:
            raise ValueError("this denoiser is class-conditional: pass class_labels")
        if class_labels.ndim == 1:
            class_labels = nn.functional.one_hot(class_labels.long(), self.label_dim)
        return class_labels.to(device=x.device, dtype=torch.float32)


class Truncated(nn.Module):
    """TCM's truncated consistency model: D(x, σ) = tuned(x, σ) where σ ≥ t′ and stage1(x, σ) below,
    with `stage1` frozen (no gradients, never updated; TCM's f_θ₁ for σ < t′).

    The tuned part sees the whole batch, so its dropout masks are those of any other call on a batch of
    that shape from the same RNG state (the online pass at σ ≥ t′ and its replayed target pass share
    them, as in ECT); the stage-1 rows are then evaluated as if they drew nothing from the stream.
    """

    def __init__(self, tuned: nn.Module, stage1: nn.Module, t_prime: float):
        super().__init__()
        self.tuned, self.stage1, self.t_prime = tuned, stage1.requires_grad_(False), float(t_prime)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        low = sigma < self.t_prime
        if not bool(low.any()):
            return self.tuned(x, sigma, class_labels)
        out = self.tuned(x, sigma, class_labels).clone() if not bool(low.all()) else \
            torch.empty(x.shape, dtype=torch.float32, device=x.device)
        with torch.no_grad(), replayed(x.device, rng_state(x.device)):
            below = self.stage1(x[low], sigma[low], None if class_labels is None else class_labels[low])
        out[low] = below.to(out.dtype)
        return out
