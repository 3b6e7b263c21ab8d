"""Which calibration samples an algorithm works on, chosen by global index so that torchrun ranks agree.

The pipeline gives rank r the contiguous share `share(n)` of the n samples (wq.calib.distributed); an
algorithm that uses a subset (the first k samples, a minibatch order) picks global indices and keeps
the ones it holds, so the result equals one process's.
"""

from __future__ import annotations

import torch

from ..calib.distributed import all_reduce_scalar, rank_world, share


class SampleIndex:
    """n: samples over all ranks; mine: the global range this rank holds (local i is global mine.start + i)."""

    def __init__(self, n_local: int):
        self.n = int(round(all_reduce_scalar(n_local)))
        self.mine = share(self.n) if rank_world()[1] > 1 else range(n_local)
        if len(self.mine) != n_local:
            raise RuntimeError(f"this rank holds {n_local} calibration samples, expected its share {len(self.mine)} "
                               f"of {self.n}")

    def local(self, global_idx) -> list[int]:
        """The local indices of those global indices this rank holds."""
        return [i - self.mine.start for i in global_idx if i in self.mine]

    def first(self, k: int) -> list[int]:
        return self.local(range(min(k, self.n)))

    def minibatches(self, batch_size: int, seed: int):
        """Endless seeded minibatches of global indices (reshuffled each epoch), as local indices."""
        bs = max(1, min(batch_size, self.n))
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        while True:
            if len(order) < bs:
                order += torch.randperm(self.n, generator=gen).tolist()
            idx, order = order[:bs], order[bs:]
            yield self.local(idx)
