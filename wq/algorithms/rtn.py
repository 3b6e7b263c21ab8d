"""Round to nearest: no data. Min-max range per group, or an MSE search of a clipped range."""

from __future__ import annotations

from torch import Tensor

from .. import primitives as P
from ..packing import PackedWeight
from ..scheme import QuantScheme
from .base import ALGORITHMS, Algorithm, QuantResult


def rtn_quantize(w: Tensor, scheme: QuantScheme, *, mse: bool = False) -> QuantResult:
    """w: [out, in] -> codes rounded to nearest under min-max (or MSE-searched) group ranges."""
    w = w.detach().float()
    scale, zero = P.search_clip(w, scheme) if mse else P.minmax_qparams(w, scheme)  # [out, n_groups]
    q = P.quantize(w, scale, zero, scheme)  # [out, in] int32
    w_hat = P.dequantize(q, scale, zero, scheme.group_for(w.shape[1]))
    return QuantResult(PackedWeight.from_codes(q, scale, zero, scheme), P.relative_error(w, w_hat))


@ALGORITHMS.register("rtn")
class RTN(Algorithm):
    name = "rtn"

    def quantize_weight(self, w: Tensor, scheme: QuantScheme, **context) -> QuantResult:
        return rtn_quantize(w, scheme, mse=bool(self.settings.get("mse", False)))
