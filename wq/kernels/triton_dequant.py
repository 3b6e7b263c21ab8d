"""Triton dequantization: the shared in-register tile unpacker, and a full-weight dequantize kernel.

`dequant_tile` turns a [BLOCK_K, BLOCK_N] tile of packed codes (TritonWeight layout, see
triton_layout.py) into fp32 weights (q - zero) * scale; every fused matmul kernel calls it.
`dequant_matmul` is the large-M path: dequantize the whole weight once into the activation dtype
([K, N], coalesced along N) and let cuBLAS do the GEMM, which wins once M is large enough that the
matmul is compute bound and the extra K*N*2 bytes of traffic are amortized.

Importing this module imports triton; `triton_backend.py` imports it only when triton is usable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_layout import TritonWeight

# How per-group tensors (scales, zeros) are read for a K tile; chosen in python as a constexpr.
SCALE_ROW = 0  # the whole tile lies in one group (group % BLOCK_K == 0, or one group per row)
SCALE_BCAST = 1  # BLOCK_K % group == 0: read BLOCK_K // group rows and broadcast each over its group
SCALE_GATHER = 2  # anything else, or act-order g_idx: gather the group of every input row


def scale_mode(tw: TritonWeight, block_k: int) -> int:
    n_groups = -(-tw.in_features // tw.group)
    if tw.g_idx is not None:
        return SCALE_GATHER
    if n_groups == 1 or tw.group % block_k == 0:
        return SCALE_ROW
    if block_k % tw.group == 0:
        return SCALE_BCAST
    return SCALE_GATHER


@triton.jit
def _group_tile(ptr, gi_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, n_groups,
                G: tl.constexpr, MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per-group values (row-major [n_groups, N]) expanded to the [BLOCK_K, BLOCK_N] tile, as fp32."""
    if MODE == 0:
        row = tl.load(ptr + (k0 // G) * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        vals = tl.broadcast_to(row[None, :], (BLOCK_K, BLOCK_N))
    elif MODE == 1:
        GPT: tl.constexpr = BLOCK_K // G  # groups per tile
        g = k0 // G + tl.arange(0, GPT)
        rows = tl.load(ptr + g[:, None] * N + offs_n[None, :],
                       mask=(g[:, None] < n_groups) & mask_n[None, :], other=0).to(tl.float32)
        vals = tl.reshape(tl.broadcast_to(rows[:, None, :], (GPT, G, BLOCK_N)), (BLOCK_K, BLOCK_N))
    else:
        if gi_ptr is not None:
            g = tl.load(gi_ptr + offs_k, mask=mask_k, other=0)
        else:
            g = offs_k // G
        vals = tl.load(ptr + g[:, None] * N + offs_n[None, :],
                       mask=mask_k[:, None] & mask_n[None, :], other=0).to(tl.float32)
    return vals


@triton.jit
def dequant_tile(qw_ptr, qh_ptr, s_ptr, z_ptr, gi_ptr, k0, offs_n, K, N, n_groups,
                 G: tl.constexpr, BITS: tl.constexpr, CONST_ZERO: tl.constexpr, MODE: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N] weights W^T[k0:k0+BLOCK_K, offs_n]; rows k >= K come out as 0."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    if BITS == 3:
        lo = tl.load(qw_ptr + (offs_k // 16)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        hi = tl.load(qh_ptr + (offs_k // 32)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        q = ((lo >> ((offs_k % 16) * 2)[:, None]) & 3) | (((hi >> (offs_k % 32)[:, None]) & 1) << 2)
    else:
        PER: tl.constexpr = 32 // BITS  # codes per word
        words = tl.load(qw_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        q = (words >> ((offs_k % PER) * BITS)[:, None]) & ((1 << BITS) - 1)
    s = _group_tile(s_ptr, gi_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, n_groups, G, MODE, BLOCK_K, BLOCK_N)
    if CONST_ZERO >= 0:
        w = (q - CONST_ZERO).to(tl.float32) * s
    else:
        z = _group_tile(z_ptr, gi_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, n_groups, G, MODE,
                        BLOCK_K, BLOCK_N)
        w = (q.to(tl.float32) - z) * s
    return tl.where(mask, w, 0.0)


@triton.jit
def _dequant_kernel(w_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, gi_ptr, K, N, n_groups,
                    G: tl.constexpr, BITS: tl.constexpr, CONST_ZERO: tl.constexpr, MODE: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = dequant_tile(qw_ptr, qh_ptr, s_ptr, z_ptr, gi_ptr, k0, offs_n, K, N, n_groups, G,
                     BITS, CONST_ZERO, MODE, BLOCK_K, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w,
             mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


def dequantize_kn(tw: TritonWeight, dtype: torch.dtype) -> Tensor:
    """The whole weight, transposed: [K, N] in `dtype` (= PackedWeight.dequantize().t())."""
    k, n = tw.in_features, tw.out_features
    w = torch.empty(k, n, dtype=dtype, device=tw.qweight.device)
    block_k, block_n = 64, 128
    mode = scale_mode(tw, block_k)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](w, tw.qweight, tw.qhigh, tw.scales, tw.zeros, tw.g_idx, k, n,
                          tw.scales.shape[0], G=tw.group, BITS=tw.bits, CONST_ZERO=tw.const_zero, MODE=mode,
                          BLOCK_K=block_k, BLOCK_N=block_n)
    return w


def dequant_matmul(x: Tensor, tw: TritonWeight, bias: Tensor | None = None) -> Tensor:
    """x [..., K] -> [..., N]: dequantize to x.dtype, then torch.matmul (cuBLAS on GPU)."""
    w = dequantize_kn(tw, x.dtype)
    y = torch.matmul(x, w)
    return y if bias is None else y + bias.to(y.dtype)
