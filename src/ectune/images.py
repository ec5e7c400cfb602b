"""Image conversion and output: uint8 ↔ [-1, 1] tensors, PNG grids and .npz sample files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) → float32 in [-1, 1]: x / 127.5 − 1, EDM's convention (the inverse of `to_uint8`)."""
    return x.to(torch.float32) / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] → uint8 (B, C, H, W), rounding like EDM's generate script."""
    return (x.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()


def grid_image(images: np.ndarray, cols: int | None = None, pad: int = 2) -> Image.Image:
    """uint8 (B, C, H, W) → one PIL image tiling them in rows of `cols` with `pad` pixels between."""
    b, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[y:y + h, x:x + w] = img.transpose(1, 2, 0)
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas[..., :3])


def save_samples(x: torch.Tensor, path: str | Path, seeds=None) -> Path:
    """Write samples as a PNG grid (`.png`) or raw uint8 N×C×H×W with their seeds (`.npz`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(x)
    if path.suffix.lower() == ".npz":
        np.savez(path, images=arr, seeds=np.asarray(seeds if seeds is not None else [], dtype=np.int64))
    else:
        grid_image(arr).save(path)
    return path
