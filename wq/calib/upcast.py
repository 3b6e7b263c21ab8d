"""fp32 calibration math on a block whose planned Linears keep their 16-bit weights.

Calibration computes in fp32 (the CPU has no bf16 matmul worth using, and Hessians want the precision),
but a bf16 or fp16 weight converts to fp32 exactly: computing `F.linear(x, W.float())` one Linear at a time
gives the same outputs as an fp32 copy of the whole block, and the block is held at half the size (86 MiB
less for one hidden-2048 Llama block; 1.6 GiB less for one Llama-3.1-405B block).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UPCAST_EXACT = (torch.bfloat16, torch.float16)  # storage dtypes whose fp32 conversion is exact


def _linear_fp32(lin: nn.Linear, x: Tensor) -> Tensor:
    """lin's forward with its weight (and bias) converted to fp32 for this call only."""
    return F.linear(x, lin.weight.float(), None if lin.bias is None else lin.bias.float())


@contextlib.contextmanager
def fp32_linears(linears: Iterable[nn.Module]) -> Iterator[None]:
    """While inside, every nn.Linear in `linears` whose weight is not fp32 computes in fp32 (an instance
    `forward`, so its hooks still run); its stored weight is untouched. Other modules are left alone."""
    patched = []
    try:
        for lin in linears:
            if isinstance(lin, nn.Linear) and lin.weight.dtype != torch.float32 and "forward" not in vars(lin):
                lin.forward = functools.partial(_linear_fp32, lin)
                patched.append(lin)
        yield
    finally:
        for lin in patched:
            del lin.forward
