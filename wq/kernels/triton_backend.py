"""Registers the Triton kernels in the dispatch table, without importing triton at wq import time.

Three entries, one layout (`prepare_triton`, shared through the dispatcher's per-kernel cache):
    triton_gemv     M = 1..8       FMA GEMV, split-K reduced in-kernel    (triton_matmul.gemv)
    triton_gemm     M = 9..1024    tensor-core GEMM                       (triton_matmul.gemm)
    triton_dequant  M > 1024       dequantize to bf16/fp16 + cuBLAS       (triton_dequant.dequant_matmul)
The M boundaries come from triton_configs.PATH_MAX_M; they are first guesses until
scripts/gpu_check.sh has measured them on an H100.

`available()` is True only where triton (>= TRITON_FLOOR) imports and CUDA is present;
`why_unavailable()` says why not. Under the Triton interpreter (TRITON_INTERPRET=1, CI) the kernels
run on CPU tensors: tests call them directly (`gemv(x, prepare_triton(pw))`); the dispatcher never
picks them for CPU tensors, so setting the interpreter never slows a CPU model down behind the
user's back. A layer whose act-order g_idx cannot be sorted into whole groups (never produced by
GPTQ) runs the reference kernel; that is logged once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
from torch import Tensor

from ..packing import PackedWeight
from .dispatch import KERNELS, Kernel
from .reference import reference_matmul
from .triton_configs import PATH_MAX_M
from .triton_layout import TritonWeight, prepare_triton

log = logging.getLogger(__name__)

BITS = frozenset({2, 3, 4, 8})
GROUPS = frozenset({-1, 32, 64, 128, 256})
DTYPES = frozenset({torch.float16, torch.bfloat16})
GEMV_MAX_M = PATH_MAX_M["gemv"]
DEQUANT_MIN_M = PATH_MAX_M["gemm_l"] + 1
TRITON_FLOOR = (3, 2)  # the lowest Triton the kernels are checked on (pyproject's floor; tests/test_triton_floor.py)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:2] if p.isdigit())


@functools.cache
def why_unavailable() -> str | None:
    """None when the Triton kernels can run on CUDA here, else the reason (and the fix)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'wq[triton]')"
    if not torch.cuda.is_available():
        return "no CUDA device (Triton kernels run on GPUs; CPU uses the reference or CPU kernels)"
    try:
        import triton
    except Exception as e:  # a broken install must be visible, not a silent fallback
        log.warning("triton is installed but failed to import: %r", e)
        return f"triton failed to import: {e!r}"
    if _version(triton.__version__) < TRITON_FLOOR:
        return (f"triton {triton.__version__} is older than {'.'.join(map(str, TRITON_FLOOR))}, the oldest the "
                f"kernels are checked on (pip install -U 'wq[triton]')")
    if getattr(torch.version, "hip", None) is None:
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"compute capability {major}.{minor} < 8.0 (the kernels need bf16 and sm_80 tensor cores)"
    return None


def available() -> bool:
    return why_unavailable() is None


_irregular_logged: set[int] = set()


def _reference(x: Tensor, pw: PackedWeight, bias: Tensor | None) -> Tensor:
    if id(pw.qweight) not in _irregular_logged:
        _irregular_logged.add(id(pw.qweight))
        log.warning("act-order g_idx of a %dx%d layer does not sort into groups of %d columns: it runs on the "
                    "reference kernel", pw.out_features, pw.in_features, pw.group)
    return reference_matmul(x, pw, bias)


def gemv(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: TritonWeight | None) -> Tensor:
    if state is None:
        return _reference(x, pw, bias)
    from . import triton_matmul

    return triton_matmul.gemv(x, state, bias)


def gemm(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: TritonWeight | None) -> Tensor:
    if state is None:
        return _reference(x, pw, bias)
    from . import triton_matmul

    return triton_matmul.gemm(x, state, bias)


def dequant(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: TritonWeight | None) -> Tensor:
    if state is None:
        return _reference(x, pw, bias)
    from . import triton_dequant

    return triton_dequant.dequant_matmul(x, state, bias)


def _prepare(pw: PackedWeight) -> TritonWeight | None:
    return prepare_triton(pw)


_common = dict(bits=BITS, group_sizes=GROUPS, devices=frozenset({"cuda"}), dtypes=DTYPES,
               available=available, prepare=_prepare, layout="triton")
KERNELS.add("triton_gemv", Kernel(name="triton_gemv", fn=gemv, max_m=GEMV_MAX_M, priority=30, **_common))
KERNELS.add("triton_gemm", Kernel(name="triton_gemm", fn=gemm, min_m=GEMV_MAX_M + 1, max_m=DEQUANT_MIN_M - 1,
                                  priority=30, **_common))
KERNELS.add("triton_dequant", Kernel(name="triton_dequant", fn=dequant, priority=20, **_common))
