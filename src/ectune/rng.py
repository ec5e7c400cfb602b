"""The process-wide RNG that dropout draws from: snapshots and a scoped replay.

Dropout masks come from torch's global CPU (or the device's CUDA) generator. ECT's target pass must
draw the online pass's masks again (ECT.md §4.5), and a checkpoint carries each rank's stream, so
both need the same two operations: take the state, and run something from a taken state.
"""

from __future__ import annotations

import contextlib

import torch


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global CPU generator's state and, on a CUDA device, that device's (else None)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    """Put the global generators back to `state` (from `rng_state`); an empty CUDA state is skipped."""
    torch.set_rng_state(state[0])
    if device.type == "cuda" and state[1] is not None and state[1].numel():
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def replayed(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]):
    """Run the block from the global RNG state `state`; afterwards the stream is where it was before
    the block, as if the block had drawn nothing (torch.random.fork_rng)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        set_rng_state(device, state)
        yield
