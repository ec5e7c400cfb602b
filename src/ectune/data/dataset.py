"""The in-memory dataset type shared by every loader: ImageDataset and the numpy -> torch wrapper."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ectune.errors import EctuneError


@dataclass
class ImageDataset:
    """A whole dataset in memory: images uint8 (N, C, H, W), labels int64 (N,) or None."""

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str

    def __post_init__(self) -> None:
        imgs = self.images
        if imgs.dtype != torch.uint8 or imgs.ndim != 4 or len(imgs) == 0:
            raise EctuneError(
                f"dataset {self.name!r}: images must be a non-empty uint8 (N, C, H, W) tensor, "
                f"got {imgs.dtype} {tuple(imgs.shape)}; convert them before building ImageDataset"
            )
        lab = self.labels
        if lab is not None and (lab.dtype != torch.int64 or tuple(lab.shape) != (len(imgs),)):
            raise EctuneError(
                f"dataset {self.name!r}: labels must be int64 of shape ({len(imgs)},), "
                f"got {lab.dtype} {tuple(lab.shape)}; pass one integer class per image or None"
            )
        if lab is not None and int(lab.min()) < 0:
            raise EctuneError(f"dataset {self.name!r}: labels must be >= 0; renumber the classes")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def resolution(self) -> int:
        """Image height H (equal to the width for all built-in datasets; see `shape`)."""
        return self.shape[1]

    @property
    def num_classes(self) -> int:
        """max(label) + 1, or 0 for an unlabelled dataset."""
        return 0 if self.labels is None else int(self.labels.max()) + 1


def _dataset(images: np.ndarray, labels: np.ndarray | None, name: str) -> ImageDataset:
    """Wrap numpy images (N, C, H, W) uint8 and labels (N,) integer as an ImageDataset."""
    lab = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)), lab, name)
