"""FP8 weight checkpoints: compressed-tensors `float-quantized` (what vLLM reads) and wq's own FP8 layout.

Per Linear (both formats): `weight` float8 [out, in] and `weight_scale` fp32 [out, n_groups]
(per channel: [out, 1]); w = weight * scale. config.json for compressed-tensors:

    {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
     "config_groups": {"group_0": {"targets": ["Linear"], "format": "float-quantized",
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true,
                    "dynamic": false, "group_size": null}, "input_activations": null, ...}},
     "ignore": ["lm_head"]}

Who reads what: FP8 (per channel, E4M3) loads in vLLM (FP8 W8A16 / W8A8 paths), in transformers with
compressed-tensors installed, and in wq. FP8G<g> is written with `strategy: group`: compressed-tensors
and wq read it, vLLM serves FP8 weights only per channel, per tensor or in 128x128 blocks, so it is
wq-only for serving. E5M2 has no compressed-tensors spelling (8-bit float means E4M3 there), so
-e5m2 schemes go to `wq-fp8` (same tensors, quant_method wq), which only wq reads.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import Tensor

from ..fp8 import FP8_DTYPES, Fp8Weight
from ..scheme import QuantScheme
from .base import FORMATS, Format, log_consumers

log = logging.getLogger(__name__)

FLOAT_QUANTIZED = "float-quantized"


def float_format_name(name: str, scheme: QuantScheme | str) -> str:
    """The FP8 flavour of a format name: 'compressed-tensors' -> 'compressed-tensors-fp8' (E4M3),
    'wq' -> 'wq-fp8'; other names pass through (and get the format's own why_not)."""
    s = QuantScheme.parse(scheme)
    if not s.is_fp8:
        return name
    if name == "compressed-tensors" and s.fmt == "e4m3":
        return "compressed-tensors-fp8"
    if name in ("wq", "compressed-tensors"):
        return "wq-fp8"
    return name


def default_fp8_format(scheme: QuantScheme) -> str:
    return "compressed-tensors-fp8" if scheme.fmt == "e4m3" else "wq-fp8"


class _Fp8Tensors(Format):
    """weight + weight_scale per Linear; subclasses write the config."""

    def why_not(self, scheme: QuantScheme) -> str | None:
        if not scheme.is_fp8:
            return f"{self.name} stores FP8 weights; {scheme} needs gptq, wq or compressed-tensors"
        return None

    def reads(self, qconfig: dict[str, Any]) -> bool:
        return qconfig.get("quant_method") == self.quant_method and qconfig.get("format") == FLOAT_QUANTIZED

    def layer_tensors(self, pw: Fp8Weight, options: dict[str, Any]) -> dict[str, Tensor]:
        return {"weight": pw.weight.contiguous(), "weight_scale": pw.scale.to(torch.float32).contiguous()}

    def read_layer(self, tensors, scheme, in_features, out_features, qconfig) -> Fp8Weight:
        w, s = tensors.get("weight"), tensors.get("weight_scale")
        if w is None or s is None:
            raise ValueError(f"an FP8 layer needs 'weight' and 'weight_scale', found {sorted(tensors)}")
        if w.dtype not in FP8_DTYPES.values():
            raise ValueError(f"FP8 weight has dtype {w.dtype}; expected float8_e4m3fn or float8_e5m2")
        fmt = "e5m2" if w.dtype == torch.float8_e5m2 else "e4m3"
        scheme = QuantScheme(bits=8, group_size=scheme.group_size, fmt=fmt).validate()
        n_groups = scheme.n_groups(in_features)
        if s.dim() == 1:  # per-tensor scale [1]: broadcast to per channel (same math)
            s = s.reshape(-1, 1).expand(out_features, 1) if s.numel() == 1 else s.reshape(out_features, -1)
        if tuple(w.shape) != (out_features, in_features) or tuple(s.shape) != (out_features, n_groups):
            raise ValueError(f"FP8 tensors {tuple(w.shape)} / scale {tuple(s.shape)} do not match {scheme} for "
                             f"[{out_features}, {in_features}] (scale expected [{out_features}, {n_groups}])")
        return Fp8Weight(weight=w, scale=s.float().contiguous(), scheme=scheme, in_features=in_features,
                         out_features=out_features)


@FORMATS.register("compressed-tensors-fp8")
class CompressedTensorsFp8(_Fp8Tensors):
    name = "compressed-tensors-fp8"
    quant_method = "compressed-tensors"

    def why_not(self, scheme):
        reason = super().why_not(scheme)
        if reason is None and scheme.fmt == "e5m2":
            return "compressed-tensors has no E5M2 spelling (8-bit float is E4M3 there); use --format wq"
        return reason

    def prepare(self, layers):
        grouped = sorted({str(pw.scheme) for pw in layers.values() if pw.scheme.group_size != -1})
        vllm = (f"{', '.join(grouped)} is written with compressed-tensors' group strategy; vLLM serves FP8 weights "
                "per channel, per tensor or in 128x128 blocks: use FP8 (per channel)") if grouped else None
        who = {"wq.load": None, "compressed-tensors": None, "transformers": None, "vllm": vllm}
        return {"vllm": not grouped, "consumers": log_consumers(self.name, who, log)}

    def quantization_config(self, quant, options):
        by_scheme: dict[str, list[str]] = {}
        for name, s in quant["layers"].items():
            by_scheme.setdefault(s, []).append(name)
        skipped = sorted((quant.get("report") or {}).get("skipped") or {})
        single = len(by_scheme) == 1 and quant.get("report") is not None
        groups = {}
        for i, (s, names) in enumerate(sorted(by_scheme.items())):
            scheme = QuantScheme.parse(s)
            groups[f"group_{i}"] = {
                "targets": ["Linear"] if single else sorted(names),
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                            "strategy": "channel" if scheme.group_size == -1 else "group",
                            "group_size": None if scheme.group_size == -1 else scheme.group_size},
                "input_activations": None, "output_activations": None, "format": FLOAT_QUANTIZED,
            }
        return {"quant_method": "compressed-tensors", "format": FLOAT_QUANTIZED,
                "quantization_status": "compressed", "config_groups": groups, "ignore": skipped,
                "kv_cache_scheme": None, "global_compression_ratio": None}

    def layer_schemes(self, qconfig, names):
        out: dict[str, QuantScheme] = {}
        for group in (qconfig.get("config_groups") or {}).values():
            wa = group.get("weights") or {}
            strategy = wa.get("strategy")
            if wa.get("type") != "float" or int(wa.get("num_bits", 0)) != 8:
                raise ValueError(f"config group {wa} is not 8-bit float weights")
            if strategy in ("channel", "tensor"):
                scheme = QuantScheme.parse("FP8")
            elif strategy == "group":
                scheme = QuantScheme.parse(f"FP8G{int(wa['group_size'])}")
            else:
                raise ValueError(f"FP8 strategy {strategy!r} is not read by wq (it reads channel, tensor, group)")
            for n in names:
                if any(t == "Linear" or t == n or (t.startswith("re:") and re.match(t[3:], n))
                       for t in group.get("targets", [])):
                    out.setdefault(n, scheme)
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"no config group targets {missing[:3]}")
        return out


@FORMATS.register("wq-fp8")
class WqFp8(_Fp8Tensors):
    """wq's own FP8 layout: any FP8 scheme (E5M2, any group), per-layer schemes in the config."""

    name = "wq-fp8"
    quant_method = "wq"

    def prepare(self, layers):
        return {"consumers": {"wq.load": None, "vllm": "wq-fp8 (quant_method wq) is wq's own layout; E4M3 per "
                              "channel (FP8) goes to compressed-tensors, which vLLM reads"}}

    def quantization_config(self, quant, options):
        return {"quant_method": "wq", "format": FLOAT_QUANTIZED, "scheme": quant["scheme"],
                "modules": dict(quant["layers"])}

    def layer_schemes(self, qconfig, names):
        modules = qconfig.get("modules") or {}
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"wq-fp8 config names no scheme for {missing[:3]}")
        return {n: QuantScheme.parse(modules[n]) for n in names}
