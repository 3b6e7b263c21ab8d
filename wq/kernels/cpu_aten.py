"""CPU kernels on torch's own packed-weight ops (x86: vectorized for bf16 activations only).

`aten_int4`: every scheme of 4 bits or fewer through `aten._weight_int4pack_mm_for_cpu`, which
dequantizes w = (q - 8) * scale + zero with a float zero. An integer zero point z is exact there:
(q - z) * s = (q - 8) * s + (8 - z) * s, so zero = (8 - z) * s. 2/3-bit codes sit in the nibble
shifted by their zero point (q - z + 8 is in 0..15 for b <= 3 and for symmetric 4-bit), which
makes the float zero exactly 0; asymmetric 4-bit keeps the float zero (rounded to bf16). The op needs N % 16 == 0 and K % G == 0 with G in 32/64/128/256, so `prepare` pads:
extra output rows are code 8 with scale 0 and zero 0 (weight 0, sliced off), extra input columns
meet zero-padded activations (contribution exactly 0). Per-channel (G-1) runs as the group size in
32..256 that pads K least, with the scale/zero repeated. Act-order g_idx is handled by permuting
the input channels once (weights) and per call (activations) when the groups are then contiguous.

`aten_int8`: per-channel 8-bit through `aten._weight_int8pack_mm` (int8 w = q - 128, bf16 scale);
an asymmetric zero adds the exact rank-1 term y += sum_k(x) * (128 - z) * s.

Both cast activations to bf16 and the result back; scales are rounded to bf16 by the ops, so they
match the reference within bf16 tolerance, not bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..packing import PackedWeight
from .dispatch import KERNELS, Kernel
from .reference import reference_matmul

log = logging.getLogger(__name__)

INT4_GROUPS = (256, 128, 64, 32)  # what the aten op accepts, largest first
COMPUTE_DTYPE = torch.bfloat16  # the only activation dtype with a vectorized x86 path


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


@dataclass
class Int4State:
    packed: Tensor  # uint8 [Np, Kp/2], aten's layout
    scales_zeros: Tensor  # bf16 [Kp/G, Np, 2]
    group: int
    k_pad: int  # Kp - K
    perm: Tensor | None  # int64 [K]: input-channel order (act-order), None = identity


@dataclass
class Int8State:
    weight: Tensor  # int8 [Np, Kp]
    scales: Tensor  # bf16 [Np]
    zero_term: Tensor | None  # fp32 [N]: (128 - z) * s, None when symmetric
    k_pad: int


def _act_order_perm(pw: PackedWeight, group: int) -> Tensor | None | bool:
    """None: no g_idx; a permutation making each group's channels contiguous; False: not possible."""
    if pw.g_idx is None:
        return None
    gi = pw.g_idx.long().cpu()
    perm = torch.argsort(gi, stable=True)
    if not torch.equal(gi[perm], torch.arange(pw.in_features) // group):
        return False  # groups of uneven size: no contiguous layout
    return perm


def _int4_group(pw: PackedWeight) -> int:
    if pw.scheme.group_size != -1:
        return pw.scheme.group_size
    k = pw.in_features
    return min(INT4_GROUPS, key=lambda g: (_ceil_to(k, g), -g))  # least padding, then largest


def prepare_int4(pw: PackedWeight) -> Int4State | None:
    """Repack once per layer: codes -> aten int4 layout, (scale, zero) -> float (scale, (8 - z) * scale)."""
    n, k = pw.out_features, pw.in_features
    group = _int4_group(pw)
    perm = _act_order_perm(pw, pw.group)
    if perm is False:
        log.warning("aten_int4: act-order g_idx with uneven groups; this layer runs on the reference")
        return None
    kp, np_ = _ceil_to(k, group), _ceil_to(n, 16)
    q = pw.codes().cpu()  # int32 [N, K]
    s = pw.scales.float().cpu()  # [n_groups, N]
    z = pw.zeros.float().cpu()
    if perm is not None:
        q = q[:, perm]
    shift = pw.scheme.bits <= 3 or bool((pw.zeros == 8).all())
    if shift:  # q - z + 8 stays in 0..15: the zero point moves into the code, the float zero is exactly 0
        gi = torch.arange(k) // pw.group  # op order: after the act-order permutation groups are contiguous
        q = q - z.t().to(torch.int32)[:, gi] + 8
        z = torch.full_like(z, 8.0)
    if pw.scheme.group_size == -1:  # one group per row -> repeat over the Kp/G op groups
        s, z = s.expand(kp // group, n), z.expand(kp // group, n)
    codes = torch.full((np_, kp), 8, dtype=torch.int32)
    codes[:n, :k] = q
    sz = torch.zeros(kp // group, np_, 2)
    sz[:, :n, 0] = s
    sz[:, :n, 1] = (8.0 - z) * s  # 0 when shifted; otherwise the float zero of an integer zero point
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # innerKTiles unused on CPU
    dev = pw.qweight.device
    return Int4State(packed.to(dev), sz.to(COMPUTE_DTYPE).to(dev), group, kp - k,
                     None if perm is None else perm.to(dev))


def int4_matmul(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: Int4State | None) -> Tensor:
    if state is None:
        return reference_matmul(x, pw, bias)
    xs = x.reshape(-1, pw.in_features).to(COMPUTE_DTYPE)  # [M, K]
    if state.perm is not None:
        xs = xs.index_select(1, state.perm)
    if state.k_pad:
        xs = F.pad(xs, (0, state.k_pad))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xs.contiguous(), state.packed, state.group, state.scales_zeros)
    y = y[:, : pw.out_features].to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], pw.out_features)


def prepare_int8(pw: PackedWeight) -> Int8State:
    """Per-channel 8-bit: int8 codes q - 128, one bf16 scale per row, exact asymmetric correction."""
    n, k = pw.out_features, pw.in_features
    kp, np_ = _ceil_to(k, 32), _ceil_to(n, 16)  # unaligned K crashes the op (checked: K=33)
    w = torch.zeros(np_, kp, dtype=torch.int8)
    w[:n, :k] = (pw.codes().cpu() - 128).to(torch.int8)  # g_idx is irrelevant with one group
    s = pw.scales.float().cpu()[0]  # [N]
    scales = torch.zeros(np_)
    scales[:n] = s
    zero_term = None
    if not pw.scheme.sym or bool((pw.zeros != 128).any()):
        zero_term = ((128.0 - pw.zeros.float().cpu()[0]) * s).to(pw.qweight.device)
    dev = pw.qweight.device
    return Int8State(w.to(dev), scales.to(COMPUTE_DTYPE).to(dev), zero_term, kp - k)


def int8_matmul(x: Tensor, pw: PackedWeight, bias: Tensor | None, state: Int8State) -> Tensor:
    xs = x.reshape(-1, pw.in_features).to(COMPUTE_DTYPE)  # [M, K]
    xp = F.pad(xs, (0, state.k_pad)) if state.k_pad else xs
    y = torch.ops.aten._weight_int8pack_mm(xp.contiguous(), state.weight, state.scales)[:, : pw.out_features]
    if state.zero_term is not None:
        y = y.float() + xs.float().sum(-1, keepdim=True) * state.zero_term
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], pw.out_features)


KERNELS.add("aten_int4", Kernel(
    name="aten_int4", fn=int4_matmul, prepare=prepare_int4, bits=frozenset({2, 3, 4}), devices=frozenset({"cpu"}),
    priority=10, available=lambda: _has("_weight_int4pack_mm_for_cpu"), exact=False,  # x cast to bf16
))
KERNELS.add("aten_int8", Kernel(
    name="aten_int8", fn=int8_matmul, prepare=prepare_int8, bits=frozenset({8}), group_sizes=frozenset({-1}),
    devices=frozenset({"cpu"}), priority=10, available=lambda: _has("_weight_int8pack_mm"), exact=False,
))
