"""The Triton kernels' weight layout, repacked once per layer from the canonical PackedWeight.

Pure torch (no triton import), so it is testable and cheap to import everywhere.

- 2/4/8 bits: the canonical GPTQ words are already kernel friendly (32/b codes per int32 word along
  the input dimension, output columns contiguous), so they are used as they are, no copy. A kernel
  loads a [BLOCK_K / (32/b), BLOCK_N] tile of words once and unpacks the 32/b codes of each word in
  registers.
- 3 bits: the canonical stream straddles word boundaries (values 10 and 21 of each run of 32), which
  costs the kernel two loads and a funnel shift per code. It is split into two bit planes instead:
  `lo` holds the low 2 bits (16 codes per word, [ceil(K/32)*2, N]) and `hi` the top bit (32 codes per
  word, [ceil(K/32), N]). Same 3 bits per weight in memory; every code is read from fixed positions.
- zeros: when every zero point equals the symmetric midpoint 2**(b-1) the kernel gets it as a
  constant and never reads the zeros tensor.
- act-order (g_idx): the input dimension is permuted once, here, so that groups are contiguous again
  (stable sort by g_idx): codes are repacked in that order and `perm[k]` names the input column of
  sorted position k. The kernels then read scales per group exactly as without act-order and gather
  only the activations through `perm` (a [BLOCK_M, BLOCK_K] load per K step, never a scale tile).
  GPTQ's desc_act always yields groups of exactly `group` columns; a g_idx that does not (hand
  made) gets `irregular_g_idx` = True and the Triton entry points run the reference instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..packing import PackedWeight, pack


@dataclass(frozen=True)
class TritonWeight:
    """Prepared tensors for the Triton kernels (all on the PackedWeight's device)."""

    qweight: Tensor  # int32 [ceil(K/32)*b, N] (b = 2, 4, 8) or the low plane [ceil(K/32)*2, N] (b = 3)
    qhigh: Tensor | None  # int32 [ceil(K/32), N]: the top bit plane of 3-bit codes; None otherwise
    scales: Tensor  # fp16 [n_groups, N]
    zeros: Tensor  # uint8 [n_groups, N]
    perm: Tensor | None  # int32 [K]: input column of (group-sorted) position k; None without act-order
    bits: int
    group: int  # effective group length along K (G-1 -> K)
    const_zero: int  # -1: read `zeros`; else every zero point equals this value
    in_features: int
    out_features: int

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]


def split_3bit_planes(codes_kn: Tensor) -> tuple[Tensor, Tensor]:
    """int codes [K, N] in [0, 8) -> (low 2-bit plane [ceil(K/32)*2, N], high bit plane [ceil(K/32), N]).

    Word layouts (LSB first): lo word r holds codes 16r..16r+15 at bits 2j..2j+1; hi word r holds
    the top bits of codes 32r..32r+31 at bit j.
    """
    k, n = codes_kn.shape
    pad = -k % 32
    q = codes_kn.to(torch.int64)
    if pad:
        q = torch.cat([q, q.new_zeros(pad, n)], 0)
    lo = (q & 3).reshape(-1, 16, n)  # [K/16, 16, N]
    hi = (q >> 2).reshape(-1, 32, n)  # [K/32, 32, N]
    lo_w = (lo << (2 * torch.arange(16, device=q.device)).view(1, 16, 1)).sum(1)
    hi_w = (hi << torch.arange(32, device=q.device).view(1, 32, 1)).sum(1)
    return _to_int32(lo_w), _to_int32(hi_w)


def _to_int32(words: Tensor) -> Tensor:
    """uint32 values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def act_order_perm(g_idx: Tensor, group: int) -> tuple[Tensor, bool]:
    """(perm int64 [K], regular): perm sorts the input columns by group (stable); regular is True when
    the sorted groups are exactly k // group, i.e. the kernels' plain group arithmetic holds."""
    g = g_idx.long()
    perm = torch.sort(g, stable=True).indices
    expected = torch.arange(g.numel(), device=g.device) // group
    return perm, bool(torch.equal(g[perm], expected))


def irregular_g_idx(pw: PackedWeight) -> bool:
    """True when pw's g_idx cannot be sorted into plain groups of `pw.group` (Triton runs the reference)."""
    return pw.g_idx is not None and not act_order_perm(pw.g_idx, pw.group)[1]


def prepare_triton(pw: PackedWeight) -> TritonWeight | None:
    """Repack once per layer; the result is cached by the dispatcher (QuantLinear / ops cache).

    None for a g_idx whose groups are not `group` columns each (see `irregular_g_idx`)."""
    bits = pw.scheme.bits
    qhigh = perm = None
    qweight = pw.qweight
    if pw.g_idx is not None:
        perm64, regular = act_order_perm(pw.g_idx, pw.group)
        if not regular:
            return None
        perm = perm64.to(torch.int32).contiguous()
    if bits == 3 or perm is not None:
        codes_kn = pw.codes().t()  # [K, N]
        if perm is not None:
            codes_kn = codes_kn[perm64]
        if bits == 3:
            qweight, qhigh = split_3bit_planes(codes_kn)
        else:
            qweight = pack(codes_kn, bits, dim=0)
    mid = 2 ** (bits - 1)
    const_zero = mid if bool((pw.zeros == mid).all()) else -1
    return TritonWeight(
        qweight=qweight.contiguous(),
        qhigh=qhigh,
        scales=pw.scales.contiguous(),
        zeros=pw.zeros.contiguous(),
        perm=perm,
        bits=bits,
        group=pw.group,
        const_zero=const_zero,
        in_features=pw.in_features,
        out_features=pw.out_features,
    )
