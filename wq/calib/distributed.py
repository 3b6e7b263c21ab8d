"""Calibration across processes: which share of the samples this rank takes, and the reductions.

Under torchrun / accelerate every rank runs the same pipeline on its own share of the calibration
samples; calibrated algorithms call these functions where a sum over all samples is needed (gptq's
Hessian sums, autoround's gradients and losses). With one process (torch.distributed not
initialized) every function is the identity, so algorithms call them unconditionally.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialized."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (the only rank that writes files)."""
    return rank_world()[0] == 0


def share(n: int, rank: int | None = None, world: int | None = None) -> range:
    """The contiguous, deterministic share of n samples this rank takes: sizes differ by at most one,
    lower ranks take the extra ones, and the shares of ranks 0..world-1 concatenate to range(n)."""
    if rank is None or world is None:
        rank, world = rank_world()
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum `t` over the ranks, in place (identity with one process). Returns t."""
    if rank_world()[1] > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_grads_(params: Iterable[Tensor]) -> None:
    """Sum the .grad of each parameter over the ranks, in place (one flat buffer, one collective)."""
    if rank_world()[1] == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    all_reduce_sum_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_scalar(x: float) -> float:
    """Sum a Python float over the ranks (e.g. a loss summed over each rank's samples)."""
    if rank_world()[1] == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    return float(all_reduce_sum_(t).item())


def all_gather_floats(values: list[float]) -> list[float]:
    """Every rank's list concatenated in rank order (lists may differ in length)."""
    if rank_world()[1] == 1:
        return list(values)
    parts: list = [None] * rank_world()[1]
    torch.distributed.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


def offsets(local: int) -> tuple[int, int]:
    """(index of this rank's first item, total items) when each rank holds `local` consecutive items."""
    rank, world = rank_world()
    if world == 1:
        return 0, local
    counts: list = [None] * world
    torch.distributed.all_gather_object(counts, int(local))
    return sum(counts[:rank]), sum(counts)


def init_from_env(device: str | None) -> str | None:
    """Join the process group when started by torchrun / accelerate launch (WORLD_SIZE > 1): gloo on CPU,
    NCCL on GPUs (each rank on its own GPU). Returns the device this rank computes on."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or rank_world()[1] > 1:
        return device
    from accelerate import PartialState

    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return "cpu" if cpu else str(state.device)
