"""One place that reads and writes a quantizable module's weight as [out, in], whatever its layout.

nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]. Algorithms call these instead of
`module.weight` so that both work (and so the shared helper of the pipeline can replace this one).
"""

from __future__ import annotations

from torch import Tensor, nn


def is_transposed(module: nn.Module) -> bool:
    """True for modules that store the weight as [in, out] (transformers' Conv1D)."""
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> Tensor:
    """The module's weight as [out, in] (a view, not a copy)."""
    w = module.weight
    return w.t() if is_transposed(module) else w


def module_weight(module: nn.Module, w: Tensor) -> Tensor:
    """w [out, in] -> the module's own layout (for functional_call or assignment)."""
    return w.t() if is_transposed(module) else w


def set_linear_weight(module: nn.Module, w: Tensor) -> None:
    """Overwrite the module's weight in place with w [out, in] (cast to its dtype)."""
    module.weight.data.copy_(module_weight(module, w).to(module.weight.dtype))
