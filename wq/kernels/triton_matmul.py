"""Fused dequant-matmul Triton kernels: an FMA GEMV for decode (M <= 8) and a tensor-core GEMM.

y[M, N] = x[M, K] @ W^T[K, N] (+ bias), fp32 accumulation, in x's dtype. Both kernels load each
packed word once per output tile ([BLOCK_K / codes-per-word, BLOCK_N] int32, 128-bit loads along N)
and unpack its codes in registers (triton_dequant.load_words / code_f32).

- GEMV (M = 1..8): no tensor-core tile. Each thread owns 4 adjacent output columns and every packed
  row of the K step, so the K reduction stays in its registers; x is broadcast; codes become floats
  by the 2**23 trick, the zero point is subtracted in the same add and the group scale multiplies
  once per packed row (or once per K step when the step lies in one group). The K range is split
  over SPLIT_K programs so that thin layers fill the GPU; each split writes its fp32 partial and the
  last split to finish (an atomic ticket per output tile) adds the partials in split order, adds the
  bias and writes y: one launch, no zero-fill, and bit-reproducible for a given split.
- GEMM (M > 8): tiled tensor-core matmul; the unpacked [BLOCK_K, BLOCK_N] tile is cast to the dot
  dtype in registers; grouped tile order keeps weight tiles in L2 across row tiles.

Block sizes, warps and stages come from triton_configs.CONFIGS (per GPU family); the AOT test
compiles every row for sm_80/86/89/90. Act-order weights were permuted once at prepare time
(triton_layout): the kernels read x through `perm` and everything else as without act-order.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_configs import TileConfig
from .triton_dequant import MAGIC, code_f32, load_words, minus_zero
from .triton_launch import Launch, WeightMeta, device_family, interpreting, run
from .triton_layout import TritonWeight


@triton.jit
def _x_tile(x_ptr, perm_ptr, offs_m, mask_m, k, mask_k, stride_xm):
    """x[offs_m, k] as fp32 (act-order: x[offs_m, perm[k]]); zero where masked."""
    if perm_ptr is not None:
        k = tl.load(perm_ptr + k, mask=mask_k, other=0)
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _x_col(x_ptr, m, M, k, mask_k, stride_xm):
    """x[m, k] for the packed rows' input index k [KW] (rows m >= M read row M - 1 and are never stored)."""
    row = tl.minimum(m, M - 1)
    return tl.load(x_ptr + row * stride_xm + k, mask=mask_k, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _finish_row(y_ptr, part_ptr, b_ptr, m, M, offs_n, mask_n, N, n_splits, BLOCK_M: tl.constexpr):
    """The last split: y[m] = sum of the splits' partials for row m, in split order, + bias."""
    if m < M:
        _store_row(y_ptr, b_ptr, m, M, offs_n, mask_n, N, _split_sum(part_ptr, m, offs_n, mask_n, N, n_splits,
                                                                     BLOCK_M))


@triton.jit
def _split_sum(part_ptr, m, offs_n, mask_n, N, n_splits, BLOCK_M: tl.constexpr):
    total = tl.load(part_ptr + m * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
    for s_i in range(1, n_splits):
        total += tl.load(part_ptr + (s_i * BLOCK_M + m) * N + offs_n, mask=mask_n, other=0.0,
                         cache_modifier=".cg")
    return total


@triton.jit
def _store_row(y_ptr, b_ptr, m, M, offs_n, mask_n, N, acc):
    if m < M:
        if b_ptr is not None:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _gemv_kernel(x_ptr, y_ptr, part_ptr, ticket_ptr, b_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr,
                 M, N, K, stride_xm, k_per_split, n_splits, codes,
                 G: tl.constexpr, BITS: tl.constexpr, CONST_ZERO: tl.constexpr,
                 SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Every tensor is 2-D [packed rows, columns] in the layout of the word loads (4 columns per
    # thread, all packed rows of the step in each thread), or a column vector of it: no layout
    # conversions, K sums in registers. The codes of a word are walked by a loop that stays rolled
    # (its trip count `codes` is a runtime argument), so only one code's activations are live. Each row of x gets its own accumulator
    # (BLOCK_M <= 8; unused ones are compiled out).
    UNIT: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # codes per packed row
    KW: tl.constexpr = BLOCK_K // UNIT  # packed rows per K step
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, KW)
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc7 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    # a fixed trip count (bounds computed from program ids break Triton 3.2's interpreter); steps of the
    # last split past K load nothing (masked) and read the last group's scales
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_begin + kk
        rows = k0 // UNIT + offs_w
        k_first = rows * UNIT  # [KW]
        wmask = (k_first < K)[:, None] & mask_n[None, :]
        words, high = load_words(qw_ptr, qh_ptr, rows, offs_n, wmask, N, BITS)  # [KW, BLOCK_N]
        # the K step lies in one group (plan_gemv picks BLOCK_K to divide G): one scale row, applied to
        # the step's sums, one zero row
        g = tl.minimum(k0, K - 1) // G
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        zero = minus_zero(tl.zeros((1, BLOCK_N), dtype=tl.float32), z_ptr, (g * N + offs_n)[None, :],
                          mask_n[None, :], CONST_ZERO)  # -(2**23 + z)
        p0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        p1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        p2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        p3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        p4 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        p5 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        p6 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        p7 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for p in range(codes):  # = UNIT, a runtime value so that the compiler keeps the loop rolled
            w = code_f32(words, high, p, BITS) + zero  # [KW, BLOCK_N] = q - zero
            k = k_first + p
            mask_k = k < K
            if perm_ptr is not None:
                k = tl.load(perm_ptr + k, mask=mask_k, other=0)
            p0 += tl.sum(_x_col(x_ptr, 0, M, k, mask_k, stride_xm) * w, axis=0)
            if BLOCK_M > 1:
                p1 += tl.sum(_x_col(x_ptr, 1, M, k, mask_k, stride_xm) * w, axis=0)
            if BLOCK_M > 2:
                p2 += tl.sum(_x_col(x_ptr, 2, M, k, mask_k, stride_xm) * w, axis=0)
                p3 += tl.sum(_x_col(x_ptr, 3, M, k, mask_k, stride_xm) * w, axis=0)
            if BLOCK_M > 4:
                p4 += tl.sum(_x_col(x_ptr, 4, M, k, mask_k, stride_xm) * w, axis=0)
                p5 += tl.sum(_x_col(x_ptr, 5, M, k, mask_k, stride_xm) * w, axis=0)
                p6 += tl.sum(_x_col(x_ptr, 6, M, k, mask_k, stride_xm) * w, axis=0)
                p7 += tl.sum(_x_col(x_ptr, 7, M, k, mask_k, stride_xm) * w, axis=0)
        acc0 += p0 * s
        if BLOCK_M > 1:
            acc1 += p1 * s
        if BLOCK_M > 2:
            acc2 += p2 * s
            acc3 += p3 * s
        if BLOCK_M > 4:
            acc4 += p4 * s
            acc5 += p5 * s
            acc6 += p6 * s
            acc7 += p7 * s
    if not SPLIT:
        _store_row(y_ptr, b_ptr, 0, M, offs_n, mask_n, N, acc0)
        if BLOCK_M > 1:
            _store_row(y_ptr, b_ptr, 1, M, offs_n, mask_n, N, acc1)
        if BLOCK_M > 2:
            _store_row(y_ptr, b_ptr, 2, M, offs_n, mask_n, N, acc2)
            _store_row(y_ptr, b_ptr, 3, M, offs_n, mask_n, N, acc3)
        if BLOCK_M > 4:
            _store_row(y_ptr, b_ptr, 4, M, offs_n, mask_n, N, acc4)
            _store_row(y_ptr, b_ptr, 5, M, offs_n, mask_n, N, acc5)
            _store_row(y_ptr, b_ptr, 6, M, offs_n, mask_n, N, acc6)
            _store_row(y_ptr, b_ptr, 7, M, offs_n, mask_n, N, acc7)
    else:
        # split-K: write this split's partial rows, take a ticket; the last split sums all in order
        part = part_ptr + pid_k * BLOCK_M * N + offs_n
        tl.store(part, acc0, mask=mask_n)
        if BLOCK_M > 1:
            tl.store(part + N, acc1, mask=mask_n)
        if BLOCK_M > 2:
            tl.store(part + 2 * N, acc2, mask=mask_n)
            tl.store(part + 3 * N, acc3, mask=mask_n)
        if BLOCK_M > 4:
            tl.store(part + 4 * N, acc4, mask=mask_n)
            tl.store(part + 5 * N, acc5, mask=mask_n)
            tl.store(part + 6 * N, acc6, mask=mask_n)
            tl.store(part + 7 * N, acc7, mask=mask_n)
        tl.debug_barrier()  # every thread's partial is written before the (release) ticket
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1)
        if ticket == n_splits - 1:
            for m in tl.static_range(BLOCK_M):
                _finish_row(y_ptr, part_ptr, b_ptr, m, M, offs_n, mask_n, N, n_splits, BLOCK_M)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)  # ready for the next launch


@triton.jit
def _gemm_kernel(x_ptr, y_ptr, b_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr,
                 M, N, K, stride_xm,
                 G: tl.constexpr, BITS: tl.constexpr, CONST_ZERO: tl.constexpr, SCALE_ROW: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, GROUP_M: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    UNIT: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    KW: tl.constexpr = BLOCK_K // UNIT
    # tile order: groups of GROUP_M row tiles sweep the N tiles together (weight tiles stay in L2)
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    rows_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_m
    pid_n = (pid % per_group) // rows_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_w = tl.arange(0, KW)
    unit_p = tl.arange(0, UNIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = _x_tile(x_ptr, perm_ptr, offs_m, mask_m, offs_k, mask_k, stride_xm)
        rows = k0 // UNIT + offs_w
        k_first = rows * UNIT
        wmask = (k_first < K)[:, None] & mask_n[None, :]
        words, high = load_words(qw_ptr, qh_ptr, rows, offs_n, wmask, N, BITS)
        # [KW, UNIT, BLOCK_N] codes -> [BLOCK_K, BLOCK_N] weights, row kw * UNIT + p
        if BITS == 3:
            q = ((words[:, None, :] >> (2 * unit_p)[None, :, None]) & 3) | \
                ((high[:, None, :] >> unit_p[None, :, None]) & 4)
        else:
            q = (words[:, None, :] >> (BITS * unit_p)[None, :, None]) & ((1 << BITS) - 1)
        f = (q | MAGIC).to(tl.float32, bitcast=True)
        if SCALE_ROW:
            g = k0 // G
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, None, :]
            w = minus_zero(f, z_ptr, (g * N + offs_n)[None, None, :], mask_n[None, None, :], CONST_ZERO) * s
        else:
            g = (k_first // G)[:, None]
            s = tl.load(s_ptr + g * N + offs_n[None, :], mask=wmask, other=0).to(tl.float32)[:, None, :]
            w = minus_zero(f, z_ptr, (g * N + offs_n[None, :])[:, None, :], wmask[:, None, :], CONST_ZERO) * s
        w = tl.reshape(w, (BLOCK_K, BLOCK_N))
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, out_dtype=tl.float32)
    mask = mask_m[:, None] & mask_n[None, :]
    if b_ptr is not None:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def scale_row(meta: WeightMeta, block_k: int) -> bool:
    """True when every K step lies in one group (one scale row per step)."""
    return meta.n_groups == 1 or meta.group % block_k == 0


GEMV_ROW_WORDS = 32  # rows of x times packed rows per K step: the activations a thread holds per code


def gemv_block_k(cfg: TileConfig, meta: WeightMeta, block_m: int) -> int:
    """The GEMV's K step: the row's block_k, halved while block_m x packed rows > GEMV_ROW_WORDS and
    until it divides the group, so that every step lies in one group (one scale row per step,
    applied to the step's sums)."""
    unit = 16 if meta.bits == 3 else 32 // meta.bits
    bk = cfg.block_k
    while bk > unit and (bk // unit * block_m > GEMV_ROW_WORDS or (meta.n_groups > 1 and meta.group % bk)):
        bk //= 2
    if meta.n_groups > 1 and meta.group % bk:
        raise ValueError(f"group {meta.group} is not a multiple of {unit} codes; the Triton GEMV cannot serve it")
    return bk


def split_k(n: int, k: int, cfg: TileConfig, block_k: int, sms: int) -> int:
    """Splits of K for the GEMV: enough that output tiles x splits fill every SM with ~16 warps, at
    most one split per K step (and at most 64), none when the output tiles alone fill the GPU."""
    n_tiles = triton.cdiv(n, cfg.block_n)
    target = 2 * sms * max(1, 8 // cfg.num_warps)
    steps = triton.cdiv(k, block_k)
    return max(1, min(target // n_tiles, steps, 64))


def plan_gemv(meta: WeightMeta, m: int, dtype: torch.dtype, cfg: TileConfig, sms: int,
              bias: bool = False) -> tuple[Launch, int]:
    """The GEMV launch for m rows (<= cfg.block_m) and its split count."""
    k, n = meta.in_features, meta.out_features
    if m > cfg.block_m:
        raise ValueError(f"GEMV serves up to {cfg.block_m} rows, got {m}")
    block_m = max(1, triton.next_power_of_2(m))
    block_k = gemv_block_k(cfg, meta, block_m)
    splits = split_k(n, k, cfg, block_k, sms)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k  # whole K steps
    splits = triton.cdiv(k, k_per_split)
    launch = Launch(
        kernel=_gemv_kernel, grid=(triton.cdiv(n, cfg.block_n), splits), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        ptrs={"x_ptr": dtype, "y_ptr": dtype, "part_ptr": torch.float32 if splits > 1 else None,
              "ticket_ptr": torch.int32 if splits > 1 else None, "b_ptr": dtype if bias else None,
              "qw_ptr": torch.int32, "qh_ptr": torch.int32 if meta.bits == 3 else None, "s_ptr": torch.float16,
              "z_ptr": torch.uint8, "perm_ptr": torch.int32 if meta.act_order else None},
        ints={"M": m, "N": n, "K": k, "stride_xm": k, "k_per_split": k_per_split, "n_splits": splits,
              "codes": 16 if meta.bits == 3 else 32 // meta.bits},
        constexprs=dict(G=meta.group_arg, BITS=meta.bits, CONST_ZERO=meta.const_zero, SPLIT=splits > 1,
                        BLOCK_M=block_m,
                        BLOCK_N=cfg.block_n, BLOCK_K=block_k),
    )
    return launch, splits


def plan_gemm(meta: WeightMeta, m: int, dtype: torch.dtype, cfg: TileConfig, bias: bool = False,
              dot_dtype=None) -> Launch:
    k, n = meta.in_features, meta.out_features
    if dot_dtype is None:
        dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    return Launch(
        kernel=_gemm_kernel, grid=grid, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        ptrs={"x_ptr": dtype, "y_ptr": dtype, "b_ptr": dtype if bias else None, "qw_ptr": torch.int32,
              "qh_ptr": torch.int32 if meta.bits == 3 else None, "s_ptr": torch.float16, "z_ptr": torch.uint8,
              "perm_ptr": torch.int32 if meta.act_order else None},
        ints={"M": m, "N": n, "K": k, "stride_xm": k},
        constexprs=dict(G=meta.group_arg, BITS=meta.bits, CONST_ZERO=meta.const_zero,
                        SCALE_ROW=scale_row(meta, cfg.block_k), DOT_DTYPE=dot_dtype, GROUP_M=8,
                        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
    )


# split-K tickets: one int32 per output tile, zero between launches (the last split resets its own),
# so they are allocated once per (device, stream) and never resized (a CUDA graph may hold them).
# Limitation: graphs captured on one capture stream share that stream's tickets, so two of them must
# not replay concurrently on different streams (torch.cuda.graph's default capture stream is shared).
TICKETS = 1 << 14
_tickets: dict[tuple, Tensor] = {}
_tickets_lock = threading.Lock()


def _ticket_buffer(device: torch.device) -> Tensor:
    if device.type == "cuda":
        key = (device, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device, 0)
    buf = _tickets.get(key)
    if buf is None:
        with _tickets_lock:
            buf = _tickets.setdefault(key, torch.zeros(TICKETS, dtype=torch.int32, device=device))
    return buf


def _flat(x: Tensor, k: int) -> Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    return x.reshape(-1, k).contiguous()  # [M, K]


def gemv(x: Tensor, tw: TritonWeight, bias: Tensor | None = None, cfg: TileConfig | None = None,
         splits: int | None = None) -> Tensor:
    """Decode path, M = 1..8 rows (more rows, when forced, go 8 at a time). `cfg` / `splits`
    override the table (tests)."""
    meta = WeightMeta.of(tw)
    x2 = _flat(x, meta.in_features)
    fam = device_family(x.device)
    cfg = cfg or fam.config("gemv", meta.bits)
    n = meta.out_features
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    for r in range(0, x2.shape[0], cfg.block_m):
        _gemv_rows(x2[r:r + cfg.block_m], y[r:r + cfg.block_m], tw, meta, bias, cfg, fam.sms, splits)
    return y.reshape(*x.shape[:-1], n)


def _gemv_rows(x2: Tensor, y: Tensor, tw: TritonWeight, meta: WeightMeta, bias: Tensor | None, cfg: TileConfig,
               sms: int, splits: int | None) -> None:
    launch, n_splits = plan_gemv(meta, x2.shape[0], x2.dtype, cfg, sms, bias is not None)
    if splits is not None:  # tests: an explicit split count (whole K steps per split)
        bk = launch.constexprs["BLOCK_K"]
        kps = triton.cdiv(triton.cdiv(meta.in_features, splits), bk) * bk
        n_splits = triton.cdiv(meta.in_features, kps)
        launch = replace(launch, grid=(launch.grid[0], n_splits),
                         ints={**launch.ints, "k_per_split": kps, "n_splits": n_splits},
                         constexprs={**launch.constexprs, "SPLIT": n_splits > 1},
                         ptrs={**launch.ptrs, "part_ptr": torch.float32 if n_splits > 1 else None,
                               "ticket_ptr": torch.int32 if n_splits > 1 else None})
    part = ticket = None
    if n_splits > 1:
        ticket = _ticket_buffer(x2.device)
        if launch.grid[0] > ticket.numel():
            raise ValueError(f"{launch.grid[0]} output tiles exceed the {ticket.numel()} split-K tickets")
        part = torch.empty(n_splits, launch.constexprs["BLOCK_M"], meta.out_features, dtype=torch.float32,
                           device=x2.device)
    run(launch, x_ptr=x2, y_ptr=y, part_ptr=part, ticket_ptr=ticket, b_ptr=bias, qw_ptr=tw.qweight,
        qh_ptr=tw.qhigh, s_ptr=tw.scales, z_ptr=tw.zeros, perm_ptr=tw.perm)


def gemm(x: Tensor, tw: TritonWeight, bias: Tensor | None = None, cfg: TileConfig | None = None) -> Tensor:
    """Tensor-core path for M > 8 (prefill, batches)."""
    meta = WeightMeta.of(tw)
    x2 = _flat(x, meta.in_features)
    m = x2.shape[0]
    if cfg is None:
        cfg = device_family(x.device).config("gemm_s" if m <= 64 else "gemm_l", meta.bits)
    dot_dtype = tl.float32 if interpreting(_gemm_kernel) and x.dtype == torch.bfloat16 else None  # no bf16 dot there
    launch = plan_gemm(meta, m, x.dtype, cfg, bias is not None, dot_dtype)
    y = torch.empty(m, meta.out_features, dtype=x.dtype, device=x.device)
    run(launch, x_ptr=x2, y_ptr=y, b_ptr=bias, qw_ptr=tw.qweight, qh_ptr=tw.qhigh, s_ptr=tw.scales,
        z_ptr=tw.zeros, perm_ptr=tw.perm)
    return y.reshape(*x.shape[:-1], meta.out_features)


