"""A deterministic, resumable, rank-aware infinite stream of index batches."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ectune.errors import EctuneError


class BatchSampler:
    """Deterministic infinite stream of index batches over n items, resumable exactly.

    Epoch e visits all n indices in the order of torch.randperm(n) seeded with seed * 1_000_003 + e;
    global batches of batch_size run across epoch boundaries without a gap. Rank r of world_size
    gets the r-th contiguous slice (batch_size // world_size,) of every global batch. `position`
    counts the global samples consumed so far, so it is the whole state besides the fixed arguments.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, position: int = 0):
        if n < 1 or batch_size < 1 or position < 0:
            raise EctuneError(f"sampler needs n, batch_size >= 1 and position >= 0; got {n}, {batch_size}, {position}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise EctuneError(
                f"batch_size {batch_size} must divide evenly over world_size {world_size} "
                f"with 0 <= rank ({rank}) < world_size; change the batch size or the number of processes"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, position
        self._cached: tuple[int, torch.Tensor] | None = None

    @property
    def epoch(self) -> int:
        return self.position // self.n

    def _permutation(self, epoch: int) -> torch.Tensor:
        """The index order (n,) of one epoch."""
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._cached = (epoch, torch.randperm(self.n, generator=gen))
        return self._cached[1]

    def _indices(self, start: int, count: int) -> torch.Tensor:
        """Indices (count,) at global sample positions start .. start + count - 1."""
        parts = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            take = min(count, self.n - offset)
            parts.append(self._permutation(epoch)[offset : offset + take])
            start, count = start + take, count - take
        return torch.cat(parts)

    def next_batch(self) -> torch.Tensor:
        """This rank's indices, int64 (batch_size // world_size,); advances position by batch_size."""
        local = self.batch_size // self.world_size
        indices = self._indices(self.position + self.rank * local, local)
        self.position += self.batch_size
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "batch_size": self.batch_size, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at state["position"]; n and seed must match (batch size and world size may change)."""
        if state.get("n") != self.n or state.get("seed") != self.seed:
            raise EctuneError(
                f"sampler state is for n={state.get('n')}, seed={state.get('seed')} but this run has "
                f"n={self.n}, seed={self.seed}; resume with the same dataset and seed"
            )
        self.position = int(state["position"])
