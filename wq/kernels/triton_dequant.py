"""Triton dequantization: the in-register code unpackers every kernel shares, and the full-weight
dequantize kernel of the large-M path.

Every kernel loads a tile of packed words once ([BLOCK_K / (32/b), BLOCK_N] int32, output columns
contiguous) and unpacks the codes of each word in registers: code p of a word is
`(word >> p*b) & (2**b - 1)`, for 3 bits the low plane's 2 bits joined with the high plane's bit
(triton_layout.py). Codes become fp32 without an int-to-float conversion: OR-ing a code q < 2**23
into the bit pattern of 2**23 gives the float 2**23 + q exactly, and subtracting 2**23 + zero gives
q - zero in one add (`code_f32`, `minus_zero`).

`dequant_matmul` is the large-M path: dequantize the whole weight once into the activation dtype
([K, N], coalesced along N; act-order rows land at their original input index) and let cuBLAS do
the GEMM, which wins once M is large enough that the matmul is compute bound.

Importing this module imports triton; `triton_backend.py` imports it only when triton is usable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_configs import TileConfig
from .triton_launch import Launch, WeightMeta, device_family, run
from .triton_layout import TritonWeight

MAGIC: tl.constexpr = tl.constexpr(0x4B000000)  # bit pattern of the float 2**23
MAGIC_F: tl.constexpr = tl.constexpr(8388608.0)


@triton.jit
def load_words(qw_ptr, qh_ptr, rows, offs_n, mask, N, BITS: tl.constexpr):
    """The packed rows `rows` [R] x columns offs_n [C]: (words [R, C], high [R, C]). At 3 bits `high`
    holds each row's 16 top bits at bit positions 2..17 (the high-plane word, shifted); else unused."""
    words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
    if BITS == 3:
        hi = tl.load(qh_ptr + (rows // 2)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        high = (hi >> (16 * (rows % 2))[:, None]) << 2
    else:
        high = words
    return words, high


@triton.jit
def code_f32(words, high, P, BITS: tl.constexpr):
    """Code P (a constant or a loop index) of each packed row as the float 2**23 + code (exact; the
    mask and the OR fuse into one instruction)."""
    if BITS == 3:
        q = ((words >> (2 * P)) & 3) | ((high >> P) & 4)
    else:
        q = (words >> (P * BITS)) & ((1 << BITS) - 1)
    return (q | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def minus_zero(f, z_ptr, z_offs, z_mask, CONST_ZERO: tl.constexpr):
    """Codes as floats (2**23 + q, code_f32) -> q - zero, in one subtraction; z_offs / z_mask index
    the zero points (uint8, [n_groups, N]) in a shape that broadcasts against f."""
    if CONST_ZERO >= 0:
        return f - (MAGIC_F + CONST_ZERO)
    else:
        return f - (tl.load(z_ptr + z_offs, mask=z_mask, other=0).to(tl.float32) + MAGIC_F)


@triton.jit
def _dequant_kernel(w_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr, K, N,
                    G: tl.constexpr, BITS: tl.constexpr, CONST_ZERO: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One [BLOCK_K, BLOCK_N] tile of W^T; each packed word is loaded once and stored as its codes."""
    pid_k = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    UNIT: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # codes per packed row (see load_words)
    KW: tl.constexpr = BLOCK_K // UNIT
    offs_w = pid_k * KW + tl.arange(0, KW)  # packed rows
    k_first = offs_w * UNIT  # [KW]
    wmask = (k_first < K)[:, None] & mask_n[None, :]
    g = (k_first // G)[:, None]  # a word never spans two groups (G >= 32 >= codes per word)
    s = tl.load(s_ptr + g * N + offs_n[None, :], mask=wmask, other=0).to(tl.float32)
    words, high = load_words(qw_ptr, qh_ptr, offs_w, offs_n, wmask, N, BITS)
    for p in tl.static_range(UNIT):
        w = minus_zero(code_f32(words, high, p, BITS), z_ptr, g * N + offs_n[None, :], wmask, CONST_ZERO) * s
        _store_row(w_ptr, perm_ptr, k_first + p, offs_n, K, N, w)


@triton.jit
def _store_row(w_ptr, perm_ptr, k, offs_n, K, N, vals):
    """vals [KW, BLOCK_N]: weights of (sorted) input rows k -> w[row, :] (act-order: row = perm[k])."""
    mask_k = k < K
    if perm_ptr is not None:
        row = tl.load(perm_ptr + k, mask=mask_k, other=0)
    else:
        row = k
    tl.store(w_ptr + row[:, None] * N + offs_n[None, :], vals.to(w_ptr.dtype.element_ty),
             mask=mask_k[:, None] & (offs_n[None, :] < N))


def plan_dequant(meta: WeightMeta, dtype: torch.dtype, cfg: TileConfig) -> Launch:
    k, n = meta.in_features, meta.out_features
    grid = (triton.cdiv(k, cfg.block_k), triton.cdiv(n, cfg.block_n))
    return Launch(
        kernel=_dequant_kernel, grid=grid, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        ptrs={"w_ptr": dtype, "qw_ptr": torch.int32, "qh_ptr": torch.int32 if meta.bits == 3 else None,
              "s_ptr": torch.float16, "z_ptr": torch.uint8, "perm_ptr": torch.int32 if meta.act_order else None},
        ints={"K": k, "N": n},
        constexprs=dict(G=meta.group_arg, BITS=meta.bits, CONST_ZERO=meta.const_zero, BLOCK_K=cfg.block_k,
                        BLOCK_N=cfg.block_n),
    )


def dequantize_kn(tw: TritonWeight, dtype: torch.dtype) -> Tensor:
    """The whole weight, transposed: [K, N] in `dtype` (= PackedWeight.dequantize().t())."""
    w = torch.empty(tw.in_features, tw.out_features, dtype=dtype, device=tw.qweight.device)
    cfg = device_family(w.device).config("dequant", tw.bits)
    run(plan_dequant(WeightMeta.of(tw), dtype, cfg), w_ptr=w, qw_ptr=tw.qweight, qh_ptr=tw.qhigh,
        s_ptr=tw.scales, z_ptr=tw.zeros, perm_ptr=tw.perm)
    return w


def dequant_matmul(x: Tensor, tw: TritonWeight, bias: Tensor | None = None) -> Tensor:
    """x [..., K] -> [..., N]: dequantize to x.dtype, then torch.matmul (cuBLAS on GPU)."""
    w = dequantize_kn(tw, x.dtype)
    y = torch.matmul(x, w)
    return y if bias is None else y + bias.to(y.dtype)
