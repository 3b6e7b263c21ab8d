"""FP8 weight-only quantization: E4M3 (or E5M2) weights with a per-channel or per-group fp32 scale.

    scale = amax / FP8_MAX            # [out, n_groups]; amax over the group, FP8_MAX 448 (E4M3), 57344 (E5M2)
    weight = fp8(clamp(w / scale))    # [out, in] float8_e4m3fn / float8_e5m2
    w ~= weight * scale               # dequantize (the reference kernel: then F.linear)

Fp8Weight is the FP8 sibling of PackedWeight: QuantLinear holds either one, and the reference kernel
(`pw.dequantize()` then F.linear) serves both on any device. Scales stay fp32 (vLLM's FP8 W8A16 path
loads fp32 scales; the overhead is 4 bytes per group). FP8G<g> needs in_features % g == 0 (the
compressed-tensors layout has no partial groups).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .scheme import QuantScheme

FP8_DTYPES: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX: dict[str, float] = {"e4m3": 448.0, "e5m2": 57344.0}
# smallest positive subnormal: E4M3 2^-9, E5M2 2^-16; |w/scale| at or below half of it becomes 0
FP8_MIN_SUBNORMAL: dict[str, float] = {"e4m3": 2.0**-9, "e5m2": 2.0**-16}
# smallest normal: E4M3 2^-6, E5M2 2^-14
FP8_MIN_NORMAL: dict[str, float] = {"e4m3": 2.0**-6, "e5m2": 2.0**-14}
MIN_AMAX = 1e-12  # all-zero groups: any scale works; keep it positive


def _check(scheme: QuantScheme, in_features: int, name: str = "") -> None:
    if not scheme.is_fp8:
        raise ValueError(f"{scheme} is not an FP8 scheme; expected FP8, FP8G<group> or their -e5m2 variants")
    g = scheme.group_size
    if g != -1 and in_features % g:
        who = f"{name}: " if name else ""
        skip = f" or --skip {name}" if name else ""
        raise ValueError(f"{who}in_features={in_features} is not a multiple of group_size={g} for {scheme}; "
                         f"use FP8 (per-channel) or a group size that divides {in_features}{skip}")


def fp8_scales(w: Tensor, scheme: QuantScheme) -> Tensor:
    """fp32 [out, n_groups]: amax of each group / the format's max."""
    out_f, in_f = w.shape
    _check(scheme, in_f)
    g = scheme.group_for(in_f)
    amax = w.float().abs().reshape(out_f, in_f // g, g).amax(dim=2)  # [out, n_groups]
    return amax.clamp(min=MIN_AMAX) / FP8_MAX[scheme.fmt]


def scaled(w: Tensor, scale: Tensor, group: int) -> Tensor:
    """w / scale in fp32, [out, in]; scale [out, n_groups]."""
    return w.float() / scale.repeat_interleave(group, dim=1)


@dataclass
class Fp8Weight:
    """An FP8 Linear weight [out_features, in_features].

    weight: float8_e4m3fn or float8_e5m2 [out, in]
    scale:  fp32 [out, n_groups]           (n_groups = 1 per channel)
    """

    weight: Tensor
    scale: Tensor
    scheme: QuantScheme
    in_features: int
    out_features: int
    g_idx: None = None  # duck-typed with PackedWeight for kernel dispatch: FP8 has no act-order

    @property
    def group(self) -> int:
        return self.scheme.group_for(self.in_features)

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    def summary(self) -> Fp8Weight:
        """Scheme and shapes for Format.prepare (see PackedWeight.summary): the weight as a meta tensor."""
        return replace(self, weight=torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta"))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """[out, in] weights in `dtype` (computed in fp32)."""
        return (self.weight.float() * self.scale.float().repeat_interleave(self.group, dim=1)).to(dtype)

    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4

    def to(self, device) -> Fp8Weight:
        return replace(self, weight=self.weight.to(device), scale=self.scale.to(device))


def fp8_quantize(w: Tensor, scheme: QuantScheme | str, *, name: str = "") -> Fp8Weight:
    """w [out, in] (any float dtype) -> Fp8Weight. `name` only makes errors point at the layer."""
    scheme = QuantScheme.parse(scheme)
    out_f, in_f = w.shape
    _check(scheme, in_f, name)
    scale = fp8_scales(w, scheme)
    x = scaled(w, scale, scheme.group_for(in_f))
    fmax = FP8_MAX[scheme.fmt]
    q = x.clamp(-fmax, fmax).to(FP8_DTYPES[scheme.fmt])  # clamp: fp32 rounding of w/scale may pass fmax
    return Fp8Weight(weight=q, scale=scale, scheme=scheme, in_features=in_f, out_features=out_f)


def fp8_reference_matmul(x: Tensor, fw: Fp8Weight, bias: Tensor | None = None) -> Tensor:
    """x [..., in] -> [..., out]: dequantize in fp32, then F.linear in x's dtype. Any device."""
    w = fw.dequantize(torch.float32).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def fp8_result(w: Tensor, scheme: QuantScheme, *, name: str = ""):
    """fp8_quantize wrapped as the algorithms' QuantResult; stats hold the audit's error columns."""
    from dataclasses import asdict

    from .algorithms.base import QuantResult
    from .fp16_audit import cast_stats
    from .primitives import relative_error

    fw = fp8_quantize(w, scheme, name=name)
    stats = cast_stats(w, FP8_DTYPES[fw.scheme.fmt], scale=fw.scale, group=fw.group)
    return QuantResult(packed=fw, error=relative_error(w, fw.dequantize()), stats=asdict(stats))
