"""The torch reference kernel: unpack, dequantize, F.linear. Ground truth on every device and dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..packing import PackedWeight


def reference_matmul(x: Tensor, pw: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """x [..., in] -> [..., out] with the dequantized weight in x's dtype."""
    w = pw.dequantize(torch.float32).to(x.dtype)  # [out, in]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
