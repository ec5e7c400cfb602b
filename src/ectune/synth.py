"""Teacher-generated tuning sets: `ectune synth` samples N images from a teacher into an .npz.

ECT tunes on data; where the teacher's own training set is private or huge, the teacher's samples can
stand in for it. Sample i uses seed `seed + i` (its noise comes from that seed alone, see
`sampling.seeded_noise`) and, for a class-conditional teacher, label (seed + i) % classes, so every
sample can be made again on its own. Large N is written in shards, each renamed into place when done:

    FILE.npz.parts/manifest.json       the settings: teacher sha256, sampler, seed, n, shard size, version
    FILE.npz.parts/shard-000000.npz    images uint8 (K, C, H, W), seeds (K,), labels (K,) if any, digest
    ...

Running the same command again skips the finished shards (a corrupt one is made again) and refuses
other settings. At the end the shards are merged into FILE.npz (`images`, `seeds`, `labels` if any, and
`manifest` as a JSON string), written atomically, and the parts folder is removed; `ectune tune --data
FILE.npz` reads it unchanged. The batch size and device are not settings: a sample does not depend on
its batch, and only float rounding differs between CPU and GPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .atomic import atomic_file
from .checkpoint import resolve_weights
from .errors import EctuneError
from .generation import choose_sampler
from .hashing import file_sha256
from .images import to_uint8
from .models import load_denoiser
from .progress import Progress
from .sampling import Sampler, sample_images, seed_labels

FORMAT = "ectune-synth-1"
_INFO_KEYS = ("teacher",)          # manifest entries that may differ on resume (the path, not the weights)


@dataclass
class SynthResult:
    """What one `synthesize` call did."""
    out: Path
    manifest: dict
    sampler: Sampler
    generated: int = 0                                  # samples made by this call
    reused: int = 0                                     # finished shards found from an earlier call
    repaired: list[str] = field(default_factory=list)   # corrupt shards that were made again
    was_complete: bool = False                          # `out` was already finished with these settings


def synthesize(teacher, out, *, n: int, seed: int = 0, shard_size: int = 1000, batch: int = 256,
               weights: str = "ema", device="cpu", progress: bool = True, **flags) -> SynthResult:
    """Sample `n` images from `teacher` into the .npz `out`, resuming an interrupted call (see module doc).

    `flags` choose the sampler as for `ectune sample` (`generation.choose_sampler`): by default heun for
    a pretrain run, consistency (`steps` steps, or times `ts`) for a tune run. A flag the sampler does not
    use is ignored, as synth always did (a resumed command repeats every flag of the first one).
    """
    out = Path(out)
    _check_args(out, n, shard_size, batch)
    weights_file = resolve_weights(teacher)
    D, cfg = load_denoiser(weights_file, which=weights, device=device)
    sampler = choose_sampler(cfg, teacher, **flags, check_unused=False)   # see the docstring
    manifest = _normalised({
        "format": FORMAT, "ectune_version": __version__, "teacher": str(teacher),
        "teacher_sha256": file_sha256(weights_file), "weights": weights, "sampler": sampler.name,
        "num_steps": sampler.steps if sampler.name == "heun" else None,
        "nfe": sampler.nfe if sampler.name == "dpmpp2m" else None,
        "ts": sampler.ts if sampler.name == "consistency" else None,
        **({"gamma": sampler.gamma} if sampler.gamma != 1 else {}),
        "seed": seed, "n": n, "shard_size": shard_size, "shape": cfg.net.image_shape, "label_dim": cfg.net.label_dim})
    result = SynthResult(out, manifest, sampler)
    if _already_done(out, manifest):
        shutil.rmtree(parts_dir(out), ignore_errors=True)   # left over if a run stopped right after merging
        result.was_complete = True
        return result
    parts = _open_parts(parts_dir(out), manifest)
    todo = []
    for i in range(len(_shard_ranges(n, shard_size))):
        path = _shard_path(parts, i)
        if _load_shard(path, manifest, i) is not None:
            result.reused += 1
        else:
            result.repaired += [path.name] if path.exists() else []
            todo.append(i)
    _generate(D, sampler, parts, manifest, todo, batch, device, progress, result)
    _merge(out, parts, manifest)
    return result


def parts_dir(out: Path) -> Path:
    """Where the shards of `out` are kept until they are merged: FILE.npz.parts/."""
    return out.with_name(out.name + ".parts")


def _check_args(out: Path, n: int, shard_size: int, batch: int) -> None:
    if out.suffix.lower() != ".npz":
        raise EctuneError(f"--out must be an .npz file, got {out}")
    if min(n, shard_size, batch) < 1:
        raise EctuneError(f"--n, --shard-size and --batch must be positive, got {n}, {shard_size}, {batch}")


def _normalised(manifest: dict) -> dict:
    """The manifest as it reads back from JSON (tuples → lists), so that comparisons are exact."""
    return json.loads(json.dumps(manifest))


def _check_same(old: dict, new: dict, where: Path) -> None:
    """Refuse to continue `where` with settings other than those it was started with."""
    diff = [k for k in sorted(set(old) | set(new)) if k not in _INFO_KEYS and old.get(k) != new.get(k)]
    if diff:
        k = diff[0]
        raise EctuneError(f"{where} was made with other settings ({', '.join(diff)} differ, e.g. {k}: "
                          f"{old.get(k)!r} there, {new.get(k)!r} now); repeat the original command to continue "
                          "it, or choose another --out")


def _already_done(out: Path, manifest: dict) -> bool:
    """True when `out` is a finished synth file of these settings; an error if it is anything else."""
    if not out.exists():
        return False
    try:
        with open(out, "rb") as f, np.load(f, allow_pickle=False) as z:
            old = json.loads(str(z["manifest"]))
    except Exception as e:  # not an npz, no manifest, bad JSON: all mean "not ours to overwrite"
        raise EctuneError(f"{out} exists and is not a finished `ectune synth` file ({type(e).__name__}); "
                          "choose another --out or delete it") from e
    _check_same(old, manifest, out)
    return True


def _open_parts(parts: Path, manifest: dict) -> Path:
    """Create the parts folder with its manifest, or check that an existing one has these settings."""
    mf = parts / "manifest.json"
    if mf.is_file():
        try:
            old = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise EctuneError(f"{mf} is unreadable ({e}); delete {parts} to start again") from None
        _check_same(old, manifest, parts)
    elif parts.exists() and any(not p.name.startswith(".") for p in parts.iterdir()):
        raise EctuneError(f"{parts} exists but holds no synth manifest; delete it or choose another --out")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        with atomic_file(mf) as f:
            f.write(json.dumps(manifest, indent=1).encode())
    for stale in parts.glob(".*.tmp"):          # left by a run that was killed while writing
        stale.unlink(missing_ok=True)
    return parts


def _shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]


def _shard_path(parts: Path, i: int) -> Path:
    return parts / f"shard-{i:06d}.npz"


def _expected(manifest: dict, i: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Seeds (K,) and labels (K,) or None of shard i."""
    lo, hi = _shard_ranges(manifest["n"], manifest["shard_size"])[i]
    seeds = np.arange(manifest["seed"] + lo, manifest["seed"] + hi, dtype=np.int64)
    return seeds, _seed_labels(seeds, manifest["label_dim"])


def _seed_labels(seeds: np.ndarray, classes: int) -> np.ndarray | None:
    """`sampling.seed_labels` as a numpy array (what the shards hold)."""
    labels = seed_labels(seeds.tolist(), classes)
    return None if labels is None else labels.numpy()


def _digest(images: np.ndarray, seeds: np.ndarray, labels: np.ndarray | None) -> str:
    h = hashlib.sha256(images.tobytes())
    h.update(seeds.tobytes())
    h.update(b"" if labels is None else labels.tobytes())
    return h.hexdigest()


def _load_shard(path: Path, manifest: dict, i: int) -> np.ndarray | None:
    """The images (K, C, H, W) of shard i if it is complete and intact, else None (missing or corrupt)."""
    if not path.is_file():
        return None
    seeds, labels = _expected(manifest, i)
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:   # own handle: see data._read_npz
            arrays = {k: z[k] for k in z.files}
    except Exception:  # a truncated or garbled zip raises many types; all mean "make it again"
        return None
    images = arrays.get("images")
    ok = (images is not None and images.dtype == np.uint8 and images.shape == (len(seeds), *manifest["shape"])
          and np.array_equal(arrays.get("seeds"), seeds) and ("labels" in arrays) == (labels is not None)
          and (labels is None or np.array_equal(arrays["labels"], labels))
          and str(arrays.get("digest")) == _digest(images, seeds, labels))
    return images if ok else None


def _generate(D, sampler: Sampler, parts: Path, manifest: dict, todo: list[int], batch: int, device,
              progress: bool, result: SynthResult) -> None:
    """Sample the shards `todo` in order, each written atomically when complete."""
    n_shards = len(_shard_ranges(manifest["n"], manifest["shard_size"]))
    done = manifest["n"] - sum(len(_expected(manifest, i)[0]) for i in todo)
    bar = Progress(manifest["n"], "synth", bar=progress, initial=done)      # --no-progress: a line every ~10%
    written = 0
    try:
        for i in todo:
            seeds, labels = _expected(manifest, i)
            chunks = []
            for lo in range(0, len(seeds), batch):
                lab = None if labels is None else torch.from_numpy(labels[lo:lo + batch])
                x = sample_images(D, seeds[lo:lo + batch].tolist(), manifest["shape"], sampler, class_labels=lab,
                                  batch=batch, device=device)
                chunks.append(to_uint8(x))
                bar.update(len(chunks[-1]))
            images = np.concatenate(chunks)
            _write_npz(_shard_path(parts, i), images=images, seeds=seeds, **_labels(labels),
                       digest=np.array(_digest(images, seeds, labels)))
            written += 1
            result.generated += len(seeds)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{n_shards - len(todo) + written} of {n_shards} shards are done in {parts}; "
                                "run the same command to continue") from None
    finally:
        bar.close()


def _labels(labels: np.ndarray | None) -> dict:
    return {} if labels is None else {"labels": labels}


def _merge(out: Path, parts: Path, manifest: dict) -> None:
    """Concatenate the shards into `out` (renamed into place when complete), then remove `parts`."""
    n, shape = manifest["n"], manifest["shape"]
    images = np.empty((n, *shape), dtype=np.uint8)
    seeds = np.arange(manifest["seed"], manifest["seed"] + n, dtype=np.int64)
    for i, (lo, hi) in enumerate(_shard_ranges(n, manifest["shard_size"])):
        shard = _load_shard(_shard_path(parts, i), manifest, i)
        if shard is None:
            raise EctuneError(f"{_shard_path(parts, i)} changed while merging; run the same command again")
        images[lo:hi] = shard
    labels = _seed_labels(seeds, manifest["label_dim"])
    text = np.array(json.dumps(manifest))
    _write_npz(out, images=images, seeds=seeds, **_labels(labels), manifest=text)
    shutil.rmtree(parts)


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.savez(f, **arrays)
