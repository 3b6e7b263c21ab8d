"""Registers the Triton kernels in the dispatch table, without importing triton at wq import time.

Three entries, one layout (`prepare_triton`, shared through the dispatcher's per-kernel cache):
    triton_gemv     M = 1..16      split-K fused dequant GEMV          (triton_matmul.gemv)
    triton_gemm     M = 17..1024   tiled fused dequant GEMM            (triton_matmul.gemm)
    triton_dequant  M > 1024       dequantize to bf16/fp16 + cuBLAS    (triton_dequant.dequant_matmul)
The M boundaries are first guesses to be tuned from `scripts/bench_kernels.py` on an H100.

`available()` is True only where triton imports and CUDA is present; `why_unavailable()` says why
not. Under the Triton interpreter (TRITON_INTERPRET=1, CI) the kernels run on CPU tensors: tests
call them directly (`gemv(x, prepare_triton(pw))`); the dispatcher never picks them for CPU
tensors, so setting the interpreter never slows a CPU model down behind the user's back.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
from torch import Tensor

from ..packing import PackedWeight
from .dispatch import KERNELS, Kernel
from .triton_layout import TritonWeight, prepare_triton

log = logging.getLogger(__name__)

BITS = frozenset({2, 3, 4, 8})
GROUPS = frozenset({-1, 32, 64, 128, 256})
DTYPES = frozenset({torch.float16, torch.bfloat16})
GEMV_MAX_M = 16
DEQUANT_MIN_M = 1025  # above this, dequantize + cuBLAS (tune on GPU)


@functools.cache
def why_unavailable() -> str | None:
    """None when the Triton kernels can run on CUDA here, else the reason (and the fix)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'wq[triton]')"
    if not torch.cuda.is_available():
        return "no CUDA device (Triton kernels run on GPUs; CPU uses the reference or CPU kernels)"
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install must be visible, not a silent fallback
        log.warning("triton is installed but failed to import: %r", e)
        return f"triton failed to import: {e!r}"
    return None


def available() -> bool:
    return why_unavailable() is None


def gemv(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: TritonWeight) -> Tensor:
    from . import triton_matmul

    return triton_matmul.gemv(x, state, bias)


def gemm(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: TritonWeight) -> Tensor:
    from . import triton_matmul

    return triton_matmul.gemm(x, state, bias)


def dequant(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: TritonWeight) -> Tensor:
    from . import triton_dequant

    return triton_dequant.dequant_matmul(x, state, bias)


def _prepare(pw: PackedWeight) -> TritonWeight:
    return prepare_triton(pw)


_common = dict(bits=BITS, group_sizes=GROUPS, devices=frozenset({"cuda"}), dtypes=DTYPES,
               available=available, prepare=_prepare, layout="triton")
KERNELS.add("triton_gemv", Kernel(name="triton_gemv", fn=gemv, max_m=GEMV_MAX_M, priority=30, **_common))
KERNELS.add("triton_gemm", Kernel(name="triton_gemm", fn=gemm, min_m=GEMV_MAX_M + 1, max_m=DEQUANT_MIN_M - 1,
                                  priority=30, **_common))
KERNELS.add("triton_dequant", Kernel(name="triton_dequant", fn=dequant, priority=20, **_common))
