"""Multi-process runs on PyTorch's own engine: torchrun sets the environment, this module reads it.

Under `torchrun --nproc_per_node N -m ectune.cli ...` every process calls `init()` once; NCCL is used
on GPUs and gloo on CPU. A single process (no torchrun) is rank 0 of a world of 1 and never touches
torch.distributed, so every helper here is a no-op there.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import EctuneError

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher) with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str = "auto") -> torch.device:
    """Join the process group torchrun describes and return this rank's device.

    "auto" picks cuda:LOCAL_RANK when GPUs are visible, else the CPU; the backend follows the device.
    """
    from .models import resolve_device
    device = resolve_device(device_name)
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise EctuneError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                              "start at most one process per GPU")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_object(obj: T) -> list[T]:
    """`obj` of every rank, in rank order (a one-element list in a single process)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give its result (or its EctuneError) to every rank.

    Used for work that touches the file system once (preparing a run folder), so that an error on
    rank 0 stops every rank with the same message instead of leaving the others waiting.
    """
    if world_size() == 1:
        return fn()
    box: list = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except EctuneError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise EctuneError(value)
    return value


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (in place; returned for chaining)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every world_size-th element starting at its rank."""
    return list(items[rank()::world_size()])


def gather_shards(local: torch.Tensor) -> torch.Tensor | None:
    """Undo `shard` along dim 0: on rank 0 the rows of every rank interleaved back into the original
    order; None on the other ranks. `local` must be on the CPU."""
    parts = all_gather_object(local)
    if not is_main():
        return None
    n = sum(p.shape[0] for p in parts)
    out = parts[0].new_empty((n, *parts[0].shape[1:]))
    for r, p in enumerate(parts):
        out[r::len(parts)] = p
    return out
