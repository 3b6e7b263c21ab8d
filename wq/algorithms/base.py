"""What an algorithm is: a registered thin class around a pure function of the weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..packing import PackedWeight
from ..registry import Registry
from ..scheme import QuantScheme


@dataclass
class QuantResult:
    packed: PackedWeight
    error: float  # relative weight error ||W - Wq||_F / ||W||_F
    stats: dict = field(default_factory=dict)  # algorithm-specific (loss, iterations, ...)


class Algorithm:
    """Decides integer codes, scales and zero points. Knows nothing of formats or kernels.

    Data-free algorithms implement `quantize_weight`. Calibrated ones set `needs_calibration` and are
    driven block by block by wq.calib (which hands them each Linear's inputs or Hessian).
    """

    name: str = ""
    needs_calibration: bool = False
    granularity: str = "layer"  # "layer": quantize_weight per Linear; "block": quantize_block per decoder block

    def __init__(self, **settings):
        self.settings = settings

    def quantize_weight(self, w: Tensor, scheme: QuantScheme, **context) -> QuantResult:
        raise NotImplementedError


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
