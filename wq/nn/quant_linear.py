"""QuantLinear: the one quantized Linear module. Holds a PackedWeight as buffers; forward dispatches."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import ops
from ..packing import PackedWeight, packed_size
from ..scheme import QuantScheme


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b, W stored packed (see PackedWeight for tensor shapes)."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme | str, bias: bool = False,
                 *, act_order: bool = False, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        scheme = QuantScheme.parse(scheme)
        if not scheme.is_int:
            raise ValueError(f"QuantLinear holds integer schemes; {scheme} is a float scheme")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        n_groups = scheme.n_groups(in_features)
        self.register_buffer("qweight", torch.zeros(packed_size(in_features, scheme.bits), out_features,
                                                    dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(n_groups, out_features, dtype=torch.uint8))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)

    @classmethod
    def from_packed(cls, pw: PackedWeight, bias: Tensor | None = None) -> QuantLinear:
        m = cls(pw.in_features, pw.out_features, pw.scheme, bias=bias is not None, act_order=pw.g_idx is not None,
                bias_dtype=bias.dtype if bias is not None else torch.bfloat16)
        m.qweight, m.scales, m.zeros = pw.qweight, pw.scales, pw.zeros
        if pw.g_idx is not None:
            m.g_idx = pw.g_idx
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(qweight=self.qweight, scales=self.scales, zeros=self.zeros, scheme=self.scheme,
                            in_features=self.in_features, out_features=self.out_features, g_idx=self.g_idx)

    def forward(self, x: Tensor) -> Tensor:
        return ops.quant_matmul(x, self.packed, self.bias)  # torch.ops.wq.dequant_matmul -> dispatch

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
