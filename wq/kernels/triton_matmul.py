"""Fused dequant-matmul Triton kernel, launched two ways: split-K GEMV (M <= 16) and tiled GEMM.

y[M, N] = x[M, K] @ W^T[K, N], W^T tiles unpacked in registers by `dequant_tile`, fp32 accumulation.

- GEMV / split-K (decode, M = 1..16): one BLOCK_M = 16 row tile; the K loop is split over SPLIT_K
  programs so that a thin output (N / BLOCK_N tiles) still fills every SM, partial sums added
  with fp32 atomics into a zeroed buffer. Memory bound: each weight word is read exactly once.
- GEMM (M > 16): classic tiled kernel, grouped tile order so weight tiles are reused from L2.

Block sizes are fixed heuristics (no autotune: the interpreter that CI runs cannot autotune);
`scripts/bench_kernels.py` on a GPU is where they get tuned. Under TRITON_INTERPRET=1 the dot
runs in fp32 for bf16 (the interpreter has no bf16 dot and truncates bf16 casts).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_dequant import dequant_tile, scale_mode
from .triton_layout import TritonWeight


@triton.jit
def _matmul_kernel(x_ptr, y_ptr, b_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, gi_ptr,
                   M, N, K, n_groups, k_per_split,
                   G: tl.constexpr, BITS: tl.constexpr, CONST_ZERO: tl.constexpr, MODE: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # tile order: groups of GROUP_M row tiles sweep the N tiles together (weight tiles stay in L2)
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_begin + kk
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = dequant_tile(qw_ptr, qh_ptr, s_ptr, z_ptr, gi_ptr, k0, offs_n, K, N, n_groups, G,
                         BITS, CONST_ZERO, MODE, BLOCK_K, BLOCK_N)  # fp32 [BLOCK_K, BLOCK_N]
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, out_dtype=tl.float32)
    mask = mask_m[:, None] & (offs_n[None, :] < N)
    ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        if b_ptr is not None:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@functools.cache
def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dot_dtype(dtype: torch.dtype):
    if _interpreting() and dtype == torch.bfloat16:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def _split_k(x: Tensor, n_tiles: int, k: int, block_k: int) -> int:
    """Enough K splits that n_tiles * splits ~ 4 waves of SMs, each split at least 2 K blocks."""
    if _interpreting() or x.device.type != "cuda":
        target = 4  # exercise the split path in interpreter tests, cheaply
    else:
        target = 4 * _sm_count(x.device.index or 0)
    splits = max(1, min(target // max(n_tiles, 1), triton.cdiv(k, 2 * block_k)))
    return 1 << (splits.bit_length() - 1)  # a power of two


def launch(x: Tensor, tw: TritonWeight, bias: Tensor | None, *, block_m: int, block_n: int, block_k: int,
            split_k: int | None, num_warps: int, num_stages: int) -> Tensor:
    shape = x.shape
    k, n = tw.in_features, tw.out_features
    if shape[-1] != k:
        raise ValueError(f"x has {shape[-1]} input features, the weight {k}")
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m = x2.shape[0]
    n_tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits = 1 if split_k is None else split_k
    # every split covers a whole number of K blocks
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    if splits > 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (n_tiles, splits)
    _matmul_kernel[grid](
        x2, y, bias if splits == 1 else None, tw.qweight, tw.qhigh, tw.scales, tw.zeros, tw.g_idx,
        m, n, k, tw.scales.shape[0], k_per_split,
        G=tw.group, BITS=tw.bits, CONST_ZERO=tw.const_zero, MODE=scale_mode(tw, block_k), DOT_DTYPE=_dot_dtype(x.dtype),
        SPLIT_K=splits, GROUP_M=8, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        y = y.to(x.dtype)
        if bias is not None:
            y += bias.to(x.dtype)
    return y.reshape(*shape[:-1], n)


def gemv(x: Tensor, tw: TritonWeight, bias: Tensor | None = None) -> Tensor:
    """Split-K path for M = 1..16 rows (decode)."""
    block_n, block_k = (32, 32) if _interpreting() else (64, 128)
    n_tiles = triton.cdiv(tw.out_features, block_n)
    splits = _split_k(x, n_tiles, tw.in_features, block_k)
    return launch(x, tw, bias, block_m=16, block_n=block_n, block_k=block_k, split_k=splits,
                   num_warps=4, num_stages=4)


def gemm(x: Tensor, tw: TritonWeight, bias: Tensor | None = None) -> Tensor:
    """Tiled path for M > 16 (prefill, large batches)."""
    m = x.numel() // x.shape[-1]
    if _interpreting():
        bm, bn, bk, warps, stages = 32, 32, 32, 4, 1
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    return launch(x, tw, bias, block_m=bm, block_n=bn, block_k=bk, split_k=None, num_warps=warps,
                   num_stages=stages)
