"""EDM preconditioning (Karras et al. 2022, Table 1): any network F becomes a denoiser D(x, σ).

    D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))

with c_skip = σd²/(σ²+σd²), c_out = σ·σd/√(σ²+σd²), c_in = 1/√(σ²+σd²), c_noise = ln(σ)/4.
At σ = 0, c_skip = 1 and c_out = 0, so D(x, 0) = x exactly; the network is never evaluated there.
"""

from __future__ import annotations

import torch
from torch import nn


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in) of EDM's Table 1 for noise levels `sigma` (any shape)."""
    s2, d2 = sigma**2, sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    return c_skip, c_out, c_in


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Noise conditioning of EDM: ln(σ)/4 (defined for σ > 0 only)."""
    return sigma.log() / 4


class EDMPrecond(nn.Module):
    """Wrap a raw network `net(x_in, noise_labels, class_labels)` into the EDM denoiser D(x, σ).

    Call as ``D(x, sigma, class_labels=None)``: x (B, C, H, W), sigma (B,) or a scalar,
    class_labels (B,) integer ids or (B, label_dim) one-hot / None. Returns (B, C, H, W) float32.
    Rows with σ = 0 return x itself without evaluating the network on them.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, label_dim: int = 0):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.label_dim = int(label_dim)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32)                                            # (B, C, H, W)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.reshape(-1).expand(x.shape[0]).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        labels = self._labels(class_labels, x)
        c_skip, c_out, c_in = edm_coefficients(sigma, self.sigma_data)
        positive = sigma > 0
        safe_sigma = torch.where(positive, sigma, torch.ones_like(sigma))  # ln(0) never reached
        F_x = self.net(c_in * x, c_noise(safe_sigma).reshape(-1), labels).to(torch.float32)
        return torch.where(positive, c_skip * x + c_out * F_x, x)

    def _labels(self, class_labels, x):
        if self.label_dim == 0:
            return None
        if class_labels is None:
            raise ValueError("this denoiser is class-conditional: pass class_labels")
        if class_labels.ndim == 1:
            class_labels = nn.functional.one_hot(class_labels.long(), self.label_dim)
        return class_labels.to(device=x.device, dtype=torch.float32)
