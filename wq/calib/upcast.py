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

from .. import primitives as P

UPCAST_EXACT = (torch.bfloat16, torch.float16)  # storage dtypes whose fp32 conversion is exact


_CHUNK = 1 << 21  # weight elements converted to fp32 at a time (8 MiB)


def _linear_fp32(lin: nn.Linear, x: Tensor) -> Tensor:
    """lin's forward with its weight (and bias) converted to fp32 for this call only, a few output rows at a time:
    the fp32 temporary is at most 8 MiB, not the whole weight (46 MiB for a 5632 x 2048 projection). Each output
    column is the same dot product over the same inputs as one fp32 F.linear computes: bit for bit on CPU
    (tests/test_upcast.py; checked at the projections of hidden-576 and hidden-2048 Llamas, 1 and 2 threads)."""
    w = lin.weight  # [out, in]
    bias = None if lin.bias is None else lin.bias.float()
    chunks = P.row_chunks(*w.shape, _CHUNK)
    if len(chunks) == 1:
        return F.linear(x, w.float(), bias)
    y = x.new_empty(*x.shape[:-1], w.shape[0])  # [..., out]
    for r0, r1 in chunks:
        y[..., r0:r1] = F.linear(x, w[r0:r1].float(), None if bias is None else bias[r0:r1])
    return y


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
