"""QuantLinear: the one quantized Linear module. Holds a PackedWeight (integer schemes) or an Fp8Weight
(FP8 schemes, see wq/fp8.py) as buffers; forward dispatches."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..fp8 import FP8_DTYPES, Fp8Weight, fp8_reference_matmul
from ..kernels import ops
from ..packing import PackedWeight, packed_size
from ..scheme import QuantScheme


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b, W stored packed (see PackedWeight / Fp8Weight for tensor shapes).

    Integer schemes: buffers qweight, scales, zeros (+ g_idx). FP8 schemes: buffers weight (float8) and
    weight_scale (fp32 [out, n_groups]), the compressed-tensors names.
    """

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme | str, bias: bool = False,
                 *, act_order: bool = False, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        scheme = QuantScheme.parse(scheme)
        if scheme.is_cast:
            raise ValueError(f"{scheme} is a plain cast, not a QuantLinear: use wq.cast_model")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        n_groups = scheme.n_groups(in_features)
        if scheme.is_fp8:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPES[scheme.fmt]))
            self.register_buffer("weight_scale", torch.zeros(out_features, n_groups, dtype=torch.float32))
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)
            return
        self.register_buffer("qweight", torch.zeros(packed_size(in_features, scheme.bits), out_features,
                                                    dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(n_groups, out_features, dtype=torch.uint8))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)

    @classmethod
    def from_packed(cls, pw: PackedWeight | Fp8Weight, bias: Tensor | None = None) -> QuantLinear:
        m = cls(pw.in_features, pw.out_features, pw.scheme, bias=bias is not None, act_order=pw.g_idx is not None,
                bias_dtype=bias.dtype if bias is not None else torch.bfloat16)
        if isinstance(pw, Fp8Weight):
            m.weight, m.weight_scale = pw.weight, pw.scale
        else:
            m.qweight, m.scales, m.zeros = pw.qweight, pw.scales, pw.zeros
        if pw.g_idx is not None:
            m.g_idx = pw.g_idx
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    @property
    def packed(self) -> PackedWeight | Fp8Weight:
        if self.scheme.is_fp8:
            return Fp8Weight(weight=self.weight, scale=self.weight_scale, scheme=self.scheme,
                             in_features=self.in_features, out_features=self.out_features)
        return PackedWeight(qweight=self.qweight, scales=self.scales, zeros=self.zeros, scheme=self.scheme,
                            in_features=self.in_features, out_features=self.out_features, g_idx=self.g_idx)

    def forward(self, x: Tensor) -> Tensor:
        if self.scheme.is_fp8:  # FP8: the reference kernel (dequantize, F.linear) on any device
            return fp8_reference_matmul(x, self.packed, self.bias)
        return ops.quant_matmul(x, self.packed, self.bias)  # torch.ops.wq.dequant_matmul -> dispatch

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not recast the stored format: fp16 scales (int schemes; a bf16 copy
        # would lose 3 mantissa bits and break reload equality), float8 weights and fp32 scales (FP8).
        # They only follow the device; the bias follows dtype and device as usual.
        names = ("weight", "weight_scale") if self.scheme.is_fp8 else ("scales",)
        keep = {k: self._buffers.pop(k) for k in names if self._buffers.get(k) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in keep.items():
                self._buffers[k] = t.to(fn(t.new_empty(0)).device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
