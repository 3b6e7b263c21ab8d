"""GPTQ checkpoints (and wq's native variant of the same tensors).

Per Linear: qweight int32 [in*b/32, out] (codes packed along input rows, LSB first), qzeros int32
[n_groups, out*b/32] (packed along output columns), scales fp16 [n_groups, out], g_idx int32 [in].
The GPTQ v1 quirk: qzeros stores zero - 1 (readers add 1 back). That cannot hold a zero point of 0,
so a checkpoint where any group has zero 0 is written as `checkpoint_format: gptq_v2` (zero stored
as is). wq's native format is the same tensors with exact zeros, `quant_method: wq`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..packing import PackedWeight, default_g_idx, pack, unpack
from ..scheme import QuantScheme
from .base import FORMATS, Format, log_consumers, partial_group_reason

log = logging.getLogger(__name__)


class _GPTQTensors(Format):
    """Shared tensor layout; subclasses decide the zero-point offset and the config keys."""

    def zero_offset(self, options: dict[str, Any]) -> int:
        return 0

    def why_not(self, scheme: QuantScheme) -> str | None:
        if not scheme.is_int:
            return f"{self.name} stores integer weights; {scheme} needs compressed-tensors or wq's float path"
        return None

    def layer_tensors(self, pw: PackedWeight, options: dict[str, Any]) -> dict[str, Tensor]:
        b = pw.scheme.bits
        zeros = pw.zeros.to(torch.int32) - self.zero_offset(options)  # [n_groups, out]
        g_idx = pw.g_idx if pw.g_idx is not None else default_g_idx(pw.in_features, pw.scheme)
        return {
            "qweight": pw.qweight.contiguous(),
            "qzeros": pack(zeros & ((1 << b) - 1), b, dim=1),
            "scales": pw.scales.to(torch.float16).contiguous(),
            "g_idx": g_idx.to(torch.int32).contiguous(),
        }

    def read_layer(self, tensors, scheme, in_features, out_features, qconfig) -> PackedWeight:
        b = scheme.bits
        offset = self.zero_offset(self.options_from_config(qconfig))
        zeros = unpack(tensors["qzeros"], b, out_features, dim=1) + offset
        expect_rows = -(-in_features // 32) * b
        if tensors["qweight"].shape != (expect_rows, out_features):
            raise ValueError(f"qweight shape {tuple(tensors['qweight'].shape)} does not match {scheme} for "
                             f"[{out_features}, {in_features}] (expected ({expect_rows}, {out_features}))")
        g_idx = tensors.get("g_idx")
        if g_idx is not None and torch.equal(g_idx.to(torch.int32), default_g_idx(in_features, scheme)):
            g_idx = None
        return PackedWeight(
            qweight=tensors["qweight"].to(torch.int32),
            scales=tensors["scales"].to(torch.float16),
            zeros=zeros.to(torch.uint8),
            scheme=scheme,
            in_features=in_features,
            out_features=out_features,
            g_idx=None if g_idx is None else g_idx.to(torch.int32),
        )

    def options_from_config(self, qconfig: dict[str, Any]) -> dict[str, Any]:
        return {}

    def layer_schemes(self, qconfig, names):
        scheme = QuantScheme(bits=int(qconfig["bits"]), group_size=int(qconfig.get("group_size", -1)),
                             sym=bool(qconfig.get("sym", True))).validate()
        return dict.fromkeys(names, scheme)

    def _common_config(self, quant: dict[str, Any]) -> dict[str, Any]:
        main = QuantScheme.parse(quant["scheme"])
        args = quant.get("algo_args", {})
        return {
            "bits": main.bits,
            "group_size": main.group_size,
            "sym": main.sym,
            "desc_act": bool(args.get("act_order", False)),
            "static_groups": bool(args.get("act_order", False)),
            "damp_percent": float(args.get("damp", 0.01)),
            "true_sequential": True,
        }


def gptq_consumers(layers: dict[str, PackedWeight], checkpoint_format: str) -> dict[str, str | None]:
    """Who loads a GPTQ checkpoint of these layers: name -> None (yes) or why not. vLLM's GPTQ and Marlin methods
    refuse a Linear whose in_features is not a multiple of the group size ("input size is not aligned"); a
    gptq_v2 checkpoint needs a vLLM that knows the v2 zero points (older ones read them as v1: wrong weights)."""
    reasons = [r for r in (partial_group_reason(layers),
                           "checkpoint_format gptq_v2 (exact zero points) is read correctly only by a vLLM with "
                           "GPTQ v2 support; use -sym, or --format compressed-tensors" if checkpoint_format == "gptq_v2"
                           else None) if r]
    return {"wq.load": None, "vllm": "; ".join(reasons) or None}


@FORMATS.register("gptq")
class GPTQ(_GPTQTensors):
    name = "gptq"
    quant_method = "gptq"

    def prepare(self, layers: dict[str, PackedWeight]) -> dict[str, Any]:
        has_zero0 = any(bool((pw.zeros == 0).any()) for pw in layers.values())
        if has_zero0:
            log.warning("some groups have zero point 0, which GPTQ v1 (zero-1) cannot store: writing "
                        "checkpoint_format gptq_v2 (read by GPTQModel; use --format wq or compressed-tensors "
                        "for other readers)")
        fmt = "gptq_v2" if has_zero0 else "gptq"
        return {"checkpoint_format": fmt, "consumers": log_consumers(self.name, gptq_consumers(layers, fmt), log)}

    def zero_offset(self, options):
        return 1 if options.get("checkpoint_format", "gptq") == "gptq" else 0  # v1 stores zero - 1

    def options_from_config(self, qconfig):
        return {"checkpoint_format": qconfig.get("checkpoint_format", "gptq")}

    def quantization_config(self, quant, options):
        cfg = {"quant_method": "gptq", **self._common_config(quant),
               "checkpoint_format": options["checkpoint_format"]}
        schemes = {QuantScheme.parse(s) for s in quant["layers"].values()}
        if len(schemes) > 1:  # GPTQModel's per-module overrides ("+:" regex -> settings)
            main = QuantScheme.parse(quant["scheme"])
            cfg["dynamic"] = {
                "+:" + name.replace(".", r"\.") + "$": {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
                for name, s in ((n, QuantScheme.parse(v)) for n, v in quant["layers"].items()) if s != main
            }
        return cfg

    def layer_schemes(self, qconfig, names):
        import re

        base = super().layer_schemes(qconfig, names)
        for pattern, over in (qconfig.get("dynamic") or {}).items():
            if not pattern.startswith("+:"):
                continue
            for n in names:
                if re.search(pattern[2:], n):
                    base[n] = QuantScheme(bits=int(over.get("bits", base[n].bits)),
                                          group_size=int(over.get("group_size", base[n].group_size)),
                                          sym=bool(over.get("sym", base[n].sym))).validate()
        return base


@FORMATS.register("wq")
class Native(_GPTQTensors):
    """wq's own: GPTQ tensors, exact zero points, any bits, per-layer schemes in the config."""

    name = "wq"
    quant_method = "wq"

    def prepare(self, layers: dict[str, PackedWeight]) -> dict[str, Any]:
        return {"consumers": {"wq.load": None, "transformers (after import wq)": None,
                              "vllm": "quant_method wq is wq's own; use --format gptq or compressed-tensors"}}

    def quantization_config(self, quant, options):
        return {"quant_method": "wq", "scheme": quant["scheme"], **self._common_config(quant),
                "modules": dict(quant["layers"])}

    def layer_schemes(self, qconfig, names):
        modules = qconfig.get("modules") or {}
        return {n: QuantScheme.parse(modules[n]) for n in names if n in modules} or super().layer_schemes(
            qconfig, names)
