"""What a checkpoint format is: a converter between PackedWeight and a layout on disk."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..packing import PackedWeight
from ..registry import Registry
from ..scheme import QuantScheme


class Format:
    """One checkpoint layout. Quirks of the layout stay inside its subclass.

    name: the --format value; quant_method: what config.json's quantization_config says.
    """

    name: str = ""
    quant_method: str = ""

    def reads(self, qconfig: dict[str, Any]) -> bool:
        """Whether this format reads a checkpoint with this quantization_config."""
        return qconfig.get("quant_method") == self.quant_method

    def why_not(self, scheme: QuantScheme) -> str | None:
        """None if this format can store `scheme`, else why not (and what to use instead)."""
        return None

    def prepare(self, layers: dict[str, PackedWeight]) -> dict[str, Any]:
        """Checkpoint-wide choices made once from all layers (e.g. GPTQ v1 vs v2). In streamed runs the
        layers are PackedWeight.summary()s: read schemes, shapes, g_idx and zero-point values only."""
        return {}

    def layer_tensors(self, pw: PackedWeight, options: dict[str, Any]) -> dict[str, Tensor]:
        """Tensors of one quantized Linear, keyed by suffix (e.g. "qweight")."""
        raise NotImplementedError

    def read_layer(self, tensors: dict[str, Tensor], scheme: QuantScheme, in_features: int,
                   out_features: int, qconfig: dict[str, Any]) -> PackedWeight:
        raise NotImplementedError

    def quantization_config(self, quant: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """config.json's quantization_config; `quant` is model.wq_quant (scheme, algo, layers...)."""
        raise NotImplementedError

    def layer_schemes(self, qconfig: dict[str, Any], names: list[str]) -> dict[str, QuantScheme]:
        """Per-layer schemes of a checkpoint without wq.json (written by another tool)."""
        raise NotImplementedError


FORMATS: Registry[type[Format]] = Registry("format")


def partial_group_reason(layers: dict[str, PackedWeight]) -> str | None:
    """Why readers that need in_features % group_size == 0 (vLLM, compressed-tensors, auto-round) cannot
    load these layers, or None."""
    partial = [(n, pw) for n, pw in layers.items()
               if pw.scheme.group_size != -1 and pw.in_features % pw.scheme.group_size]
    if not partial:
        return None
    n, pw = partial[0]
    return (f"{len(partial)} layer(s) have in_features not a multiple of the group size (e.g. {n}: "
            f"in={pw.in_features}, G={pw.scheme.group_size}); use a group that divides them (G32/G64 for 576) "
            "or G-1")
