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


GROUP_SIZES = (32, 64, 128, 256)  # the grammar's groups (QuantScheme)


def group_hint(in_features: set[int] | list[int]) -> str:
    """What to use instead, computed from the shapes themselves: the groups that divide every one of them, else
    per-channel (G-1) or skipping those layers."""
    fits = [g for g in GROUP_SIZES if all(k % g == 0 for k in in_features)]
    if fits:
        return f"use G{' or G'.join(str(g) for g in sorted(fits, reverse=True)[:2])} (they divide them), or G-1"
    return "no group size divides them: use G-1 (per channel), or --skip those layers"


def partial_group_reason(layers: dict[str, PackedWeight]) -> str | None:
    """Why readers that need in_features % group_size == 0 (vLLM, compressed-tensors, auto-round) cannot
    load these layers, or None. The hint comes from the layers' real shapes."""
    partial = [(n, pw) for n, pw in layers.items()
               if pw.scheme.group_size != -1 and pw.in_features % pw.scheme.group_size]
    if not partial:
        return None
    n, pw = partial[0]
    sizes = sorted({p.in_features for _, p in partial})
    return (f"{len(partial)} layer(s) have in_features not a multiple of the group size (e.g. {n}: "
            f"in={pw.in_features}, G={pw.scheme.group_size}; in_features {', '.join(map(str, sizes))}); "
            f"{group_hint(sizes)}")


def log_consumers(fmt: str, who: dict[str, str | None], log) -> dict[str, str | None]:
    """Say at export which readers load what is being written (and why the others do not); returns `who` for
    wq.json's "consumers"."""
    ok = [k for k, v in who.items() if v is None]
    log.info("%s export loads in: %s", fmt, ", ".join(ok) or "none")
    for k, why in who.items():
        if why is not None:
            log.warning("%s export will NOT load in %s: %s", fmt, k, why)
    return who
