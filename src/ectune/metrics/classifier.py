"""A small Fashion-MNIST CNN whose penultimate layer is ectune's feature space for FD / KID / P&R.

Inception features are meaningless on 28x28 grayscale clothes, so Fashion-MNIST samples are
measured in the features of this classifier, trained here and shipped as safetensors weights:

    python -m ectune.metrics.classifier --out src/ectune/assets/fmnist-classifier.safetensors --epochs 5

The file's metadata holds the architecture name, test accuracy, epochs, seed and the sha256 of the
weights; loading reads tensors only and never executes code from the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from torch.nn import functional as F

from ectune.errors import EctuneError
from ectune.hashing import file_sha256
from ectune.images import from_uint8

ARCHITECTURE = "fmnist-cnn-v1"
FEATURES_VERSION = f"{ARCHITECTURE}/fc-pre-relu"  # change whenever `features` changes: keys cached stats
FEATURE_DIM = 128
NUM_CLASSES = 10
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "fmnist-classifier.safetensors"


# --- the network
def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (no bias) → BatchNorm → ReLU → 2x2 max-pool: (B, c_in, H, W) → (B, c_out, H/2, W/2)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FMNISTClassifier(nn.Module):
    """CNN for x in [-1, 1] float (B, 1, 28, 28): three conv blocks → 128-d features → 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_conv_block(1, 32), _conv_block(32, 64), _conv_block(64, 128))
        self.fc = nn.Linear(128 * 3 * 3, FEATURE_DIM)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 128) for x float (B, 1, 28, 28) in [-1, 1], taken before the ReLU.

        Before the ReLU no unit is constant: after it, units that never fire would be exactly 0 on
        every image and make the feature covariance singular.
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28) or not x.is_floating_point():
            raise EctuneError(
                f"the Fashion-MNIST classifier takes float (B, 1, 28, 28) images in [-1, 1], got "
                f"{x.dtype} {tuple(x.shape)}; convert uint8 images with ectune.images.from_uint8"
            )
        h = self.blocks(x)  # (B, 128, 3, 3)
        return self.fc(h.flatten(1))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10) for x float (B, 1, 28, 28) in [-1, 1]."""
        return self.head(self.dropout(F.relu(self.features(x))))


# --- training
def _augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to `shift` pixels per image (B, 1, H, W)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (shift,) * 4, value=-1.0)  # background of Fashion-MNIST is black = -1
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, b), generator=gen))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]  # (B, 1, H, W)


@torch.no_grad()
def accuracy(model: FMNISTClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of `model` (eval mode) on uint8 images (N, 1, 28, 28) with labels (N,)."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(from_uint8(images[i : i + batch]))
        correct += int((logits.argmax(1) == labels[i : i + batch]).sum())
    return correct / len(images)


def _train_epoch(model, opt, sched, images, labels, gen, batch: int) -> float:
    """One pass over shuffled (images, labels) with augmentation; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(images), generator=gen)
    total = 0.0
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        x = _augment(from_uint8(images[idx]), gen)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(idx)
    return total / len(order)


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in sorted-name order (name, dtype, shape, bytes): identifies the weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_classifier(out_path: str | Path, epochs: int = 5, seed: int = 0, device: str = "cpu",
                     batch: int = 128, lr: float = 3e-3) -> dict:
    """Train FMNISTClassifier on the Fashion-MNIST train split, test it, save safetensors; return a summary.

    AdamW with a one-cycle learning rate, random horizontal flips and ±2 pixel shifts.
    """
    from ectune.data import load_fashion_mnist  # data is a leaf; imported here to keep import light

    if epochs < 1:
        raise EctuneError(f"epochs must be >= 1, got {epochs}; pass --epochs 5")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    model = FMNISTClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * -(-len(train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    start, losses = time.perf_counter(), []
    for epoch in range(epochs):
        losses.append(_train_epoch(model, opt, sched, train.images, train.labels, gen, batch))
        acc = accuracy(model, test.images[:2000].to(device), test.labels[:2000].to(device))
        print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}, test[:2000] acc {acc:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    model = model.cpu()
    acc = accuracy(model, test.images, test.labels)
    print(f"test accuracy {acc:.4f}", flush=True)
    summary = {"architecture": ARCHITECTURE, "test_accuracy": acc, "epochs": epochs, "seed": seed,
               "train_seconds": round(time.perf_counter() - start, 1), "train_losses": losses,
               "torch_threads": torch.get_num_threads()}
    summary["weights_sha256"] = save_classifier(model, out_path, summary)
    return summary


def save_classifier(model: FMNISTClassifier, out_path: str | Path, info: dict) -> str:
    """Write model's state_dict as safetensors with `info` (+ the weights' sha256) as metadata; return it."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    digest = weights_sha256(state)
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in info.items()}
    meta["weights_sha256"] = digest
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out_path, metadata=meta)
    return digest


# --- loading
def classifier_hash(path: str | Path | None = None) -> str:
    """sha256 of the classifier's weight file (the shipped one by default); keys cached statistics."""
    path = DEFAULT_PATH if path is None else Path(path)
    try:
        return file_sha256(path)
    except OSError as e:
        raise EctuneError(f"cannot read classifier weights {path}: {e}; pass a valid .safetensors path") from e


def read_metadata(path: str | Path | None = None) -> dict[str, str]:
    """The safetensors metadata of a classifier file (architecture, test_accuracy, ...)."""
    path = DEFAULT_PATH if path is None else Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError) as e:
        raise EctuneError(f"cannot read classifier weights {path}: {e}; pass a valid .safetensors file") from e


def load_classifier(path: str | Path | None = None) -> FMNISTClassifier:
    """FMNISTClassifier in eval mode with weights from `path` (default: the shipped asset file)."""
    path = DEFAULT_PATH if path is None else Path(path)
    meta = read_metadata(path)
    if meta.get("architecture") != ARCHITECTURE:
        raise EctuneError(
            f"{path} holds architecture {meta.get('architecture')!r}, expected {ARCHITECTURE!r}; "
            "retrain it with `python -m ectune.metrics.classifier --out PATH`"
        )
    state = load_file(str(path))
    model = FMNISTClassifier()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EctuneError(
            f"{path} does not fit {ARCHITECTURE}: missing {missing}, unexpected {unexpected}; retrain it"
        )
    if weights_sha256(state) != meta.get("weights_sha256"):
        raise EctuneError(f"{path}: weights do not match the sha256 in its metadata; the file is corrupt, retrain it")
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: train the classifier and write weights (+ a JSON card beside them)."""
    p = argparse.ArgumentParser(prog="python -m ectune.metrics.classifier", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_PATH), help="output .safetensors path")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        summary = train_classifier(args.out, epochs=args.epochs, seed=args.seed, device=args.device)
    except EctuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    card = Path(args.out).with_suffix(".json")
    summary["file_sha256"] = classifier_hash(args.out)
    summary["file_bytes"] = Path(args.out).stat().st_size
    summary["data"] = "Fashion-MNIST train (60k) for training, test (10k) for test_accuracy"
    summary["augmentation"] = "random horizontal flip, random shift up to 2 px"
    summary["feature_dim"] = FEATURE_DIM
    summary["command"] = (
        f"python -m ectune.metrics.classifier --out {args.out} --epochs {args.epochs} "
        f"--seed {args.seed} --threads {args.threads}"
    )
    card.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
