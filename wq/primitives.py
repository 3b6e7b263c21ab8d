"""Pure quantization math on [out, in] weights, group-wise along the input dimension.

Conventions (shared by every algorithm, format and kernel):
    codes q in [0, maxq], maxq = 2**bits - 1
    w ~= (q - zero) * scale            per group of `group_size` consecutive input channels
    asymmetric: range [min(w,0), max(w,0)] -> scale = (max - min) / maxq, zero = round(-min / scale)
    symmetric:  zero = 2**(bits-1) (fixed midpoint), codes -half..half-1 around it (half = 2**(bits-1)),
                scale = +-amax / half ("full range"): the sign puts the group's extreme on code 0 (-half),
                so the extreme is exact and the other side can use half-1 steps; a negative scale
                is valid in every format (w = (q - zero) * scale is all any reader computes)
Scales are rounded to fp16 (the storage dtype of every format) *before* codes are chosen, so the
codes are optimal for the scales that get saved and a reload is bit-identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .scheme import QuantScheme

SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0**-20  # all-zero groups: any scale works; keep it a normal fp16 number


def group_view(w: Tensor, group: int) -> Tensor:
    """[out, in] -> [out, n_groups, group], zero-padding a partial last group."""
    out_f, in_f = w.shape
    n_groups = -(-in_f // group)
    pad = n_groups * group - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, n_groups, group)


def row_chunks(out_f: int, in_f: int, elements: int) -> list[tuple[int, int]]:
    """(r0, r1) row ranges over [out_f, in_f] of about `elements` elements each, in multiples of 64 rows and none
    narrower than 64 (a narrow remainder joins the chunk before it): a matmul only a few columns wide takes
    another BLAS kernel, whose sums may round differently (seen on this CPU with 8 and 9 columns)."""
    rows = max(64, elements // max(in_f, 1) // 64 * 64)
    edges = list(range(0, out_f, rows))
    if len(edges) > 1 and out_f - edges[-1] < 64:
        edges.pop()
    edges.append(out_f)
    return list(zip(edges[:-1], edges[1:]))


def expand_groups(t: Tensor, group: int, in_features: int) -> Tensor:
    """[out, n_groups] -> [out, in]: repeat each group's value over its columns."""
    return t.repeat_interleave(group, dim=1)[:, :in_features]


def round_scale(scale: Tensor) -> Tensor:
    """Scale rounded to its fp16 storage value; magnitudes below MIN_SCALE raised to it, sign kept."""
    mag = scale.abs().clamp(min=MIN_SCALE)
    return torch.where(scale < 0, -mag, mag).to(SCALE_DTYPE).float()


def minmax_qparams(
    w: Tensor, scheme: QuantScheme, *, clip: float | Tensor = 1.0
) -> tuple[Tensor, Tensor]:
    """Scale and zero per group from the range of the weights.

    w: [out, in] float; clip: shrink factor of the range (scalar, or [out, n_groups]).
    Returns (scale fp32 [out, n_groups], zero fp32 [out, n_groups], integer valued).
    """
    # [out, ng, G]; zero padding of a partial last group is harmless: the range always holds 0
    g = group_view(w.float(), scheme.group_for(w.shape[1]))
    wmin = g.amin(dim=2).clamp(max=0) * clip
    wmax = g.amax(dim=2).clamp(min=0) * clip
    return _qparams_from_range(wmin, wmax, scheme)


def _qparams_from_range(wmin: Tensor, wmax: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    maxq = scheme.maxq
    if scheme.sym:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = round_scale(amax * sym_scale_factor(wmin, wmax, scheme))
        zero = torch.full_like(scale, float(2 ** (scheme.bits - 1)))
    else:
        scale = round_scale((wmax - wmin) / maxq)
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def sym_scale_factor(wmin: Tensor, wmax: Tensor, scheme: QuantScheme) -> Tensor:
    """Symmetric scale = amax * factor, factor = +1/half where the group's extreme is negative and -1/half
    where it is positive: either way (w / scale) reaches -half, code 0, at the extreme. wmin <= 0 <= wmax."""
    half = 2 ** (scheme.bits - 1)
    return torch.where(wmin.abs() >= wmax, 1.0 / half, -1.0 / half).to(wmax.dtype)


def quantize(w: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> Tensor:
    """Codes for w given per-group (scale, zero) [out, n_groups]. Returns int32 [out, in] in [0, maxq]."""
    group = scheme.group_for(w.shape[1])
    s = expand_groups(scale, group, w.shape[1])
    z = expand_groups(zero, group, w.shape[1])
    return torch.clamp(torch.round(w.float() / s) + z, 0, scheme.maxq).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, group: int) -> Tensor:
    """(q - zero) * scale, fp32 [out, in]; scale/zero [out, n_groups]."""
    in_f = q.shape[1]
    return (q.float() - expand_groups(zero.float(), group, in_f)) * expand_groups(scale.float(), group, in_f)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> Tensor:
    return dequantize(quantize(w, scale, zero, scheme), scale, zero, scheme.group_for(w.shape[1]))


def relative_error(w: Tensor, w_hat: Tensor) -> float:
    """||w - w_hat||_F / ||w||_F."""
    w = w.float()
    return float((w - w_hat.float()).norm() / w.norm().clamp(min=1e-12))


def search_clip(
    w: Tensor, scheme: QuantScheme, *, grid: int = 20, min_ratio: float = 0.75, norm: float = 2.4
) -> tuple[Tensor, Tensor]:
    """Per-group range shrink that minimises |w - fake_quant(w)|^norm (the MSE search of GPTQ/HQQ).

    Tries clip ratios linspace(1, min_ratio, grid) and keeps, per group, the best one.
    Returns (scale, zero) [out, n_groups].
    """
    w = w.float()
    group = scheme.group_for(w.shape[1])
    best_scale, best_zero = minmax_qparams(w, scheme)
    best_err = _group_err(w, best_scale, best_zero, scheme, group, norm)
    for ratio in torch.linspace(1.0, min_ratio, grid)[1:].tolist():
        scale, zero = minmax_qparams(w, scheme, clip=ratio)
        err = _group_err(w, scale, zero, scheme, group, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _group_err(w: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme, group: int, norm: float) -> Tensor:
    err = (fake_quantize(w, scale, zero, scheme) - w).abs().pow(norm)  # [out, in]
    return group_view(err, group).sum(dim=2)  # [out, n_groups]
