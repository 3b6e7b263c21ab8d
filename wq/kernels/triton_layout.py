"""The Triton kernels' weight layout, repacked once per layer from the canonical PackedWeight.

Pure torch (no triton import), so it is testable and cheap to import everywhere.

- 2/4/8 bits: the canonical GPTQ words are already kernel friendly (32/b codes per int32 word along
  the input dimension, output columns contiguous), so they are used as they are, no copy.
- 3 bits: the canonical stream straddles word boundaries (values 10 and 21 of each run of 32), which
  costs the kernel two loads and a funnel shift per code. It is split into two bit planes instead:
  `lo` holds the low 2 bits (16 codes per word, [ceil(K/32)*2, N]) and `hi` the top bit (32 codes per
  word, [ceil(K/32), N]). Same 3 bits per weight in memory; every code is read from fixed positions.
- zeros: when every zero point equals the symmetric midpoint 2**(b-1) the kernel gets it as a
  constant and never reads the zeros tensor.
- g_idx: kept (int32 [K]) when present; the kernels then gather scales per input row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..packing import PackedWeight


@dataclass(frozen=True)
class TritonWeight:
    """Prepared tensors for the Triton kernels (all on the PackedWeight's device)."""

    qweight: Tensor  # int32 [ceil(K/32)*b, N] (b = 2, 4, 8) or the low plane [ceil(K/32)*2, N] (b = 3)
    qhigh: Tensor | None  # int32 [ceil(K/32), N]: the top bit plane of 3-bit codes; None otherwise
    scales: Tensor  # fp16 [n_groups, N]
    zeros: Tensor  # uint8 [n_groups, N]
    g_idx: Tensor | None  # int32 [K] or None (group = k // group_size)
    bits: int
    group: int  # effective group length along K (G-1 -> K)
    const_zero: int  # -1: read `zeros`; else every zero point equals this value
    in_features: int
    out_features: int


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


def prepare_triton(pw: PackedWeight) -> TritonWeight:
    """Repack once per layer; the result is cached by the dispatcher (QuantLinear / ops cache)."""
    bits = pw.scheme.bits
    qhigh = None
    qweight = pw.qweight
    if bits == 3:
        codes_kn = pw.codes().t()  # [K, N]
        qweight, qhigh = split_3bit_planes(codes_kn)
    mid = 2 ** (bits - 1)
    const_zero = mid if bool((pw.zeros == mid).all()) else -1
    return TritonWeight(
        qweight=qweight.contiguous(),
        qhigh=qhigh,
        scales=pw.scales.contiguous(),
        zeros=pw.zeros.contiguous(),
        g_idx=None if pw.g_idx is None else pw.g_idx.to(torch.int32).contiguous(),
        bits=bits,
        group=pw.group,
        const_zero=const_zero,
        in_features=pw.in_features,
        out_features=pw.out_features,
    )
