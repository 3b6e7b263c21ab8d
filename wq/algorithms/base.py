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

    Data-free algorithms implement `quantize_weight(w, scheme)`. Calibrated ones set
    `needs_calibration` and are driven block by block by wq.calib.pipeline, at one of two
    granularities (the full contract is in that module's docstring):

    - "layer": `quantize_weight(w, scheme, *, H=H)`, H the [in, in] fp32 Hessian 2/n sum x^T x of
      the Linear's inputs (gptq). With `consumes_hessian` the algorithm also gets `H_owned` (True: no other
      Linear still needs this H, so it may be used as scratch) and `spill_dir` (a directory on the run's disk).
    - "block": `quantize_block(block, plan, inputs, kwargs, targets) -> {name: QuantResult}`,
      names relative to the block (autoround).
    """

    name: str = ""
    needs_calibration: bool = False
    granularity: str = "layer"  # "layer" or "block": what wq.calib hands a calibrated algorithm
    consumes_hessian: bool = False  # "layer": may overwrite an H it owns (see above)
    # "block": the planned Linears may keep their bf16/fp16 storage weights (the algorithm reads them in fp32 and
    # never writes them; wq.calib.upcast). "layer" algorithms always get them so.
    reads_16bit_weights: bool = False
    # "block": working state held while a block is quantized, in bytes per weight of its planned Linears, with one
    # process and with several (the memory estimate's "algorithm state" term; wq.plan.memory)
    state_bytes_per_weight: float = 0.0
    state_bytes_per_weight_ranks: float = 0.0
    # "block": under --low-mem, trains `low_mem_tokens` tokens per forward and backward (whole samples, at least one)
    # and holds this state instead (None: --low-mem changes neither)
    state_bytes_per_weight_low_mem: float | None = None
    low_mem_tokens: int = 0
    # "block", training: tensors of the block's widest Linear output held at the peak of a backward (7 through
    # autograd: a gated MLP's gate, up, activation, product and three gradients), and under --low-mem (None: same)
    backward_intermediates: int = 7
    backward_intermediates_low_mem: int | None = None

    def __init__(self, **settings):
        self.settings = settings

    def quantize_weight(self, w: Tensor, scheme: QuantScheme, **context) -> QuantResult:
        raise NotImplementedError

    def quantize_block(self, block, plan: dict[str, QuantScheme], inputs: list[Tensor], kwargs: list[dict],
                       targets: list[Tensor]) -> dict[str, QuantResult]:
        raise NotImplementedError(f"{self.name} is not a block-granularity algorithm")


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
