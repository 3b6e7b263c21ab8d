"""auto-round checkpoints (`quant_method: auto-round`), as auto-round's own exporter writes them.

Tensors are GPTQ's (qweight, qzeros, scales, g_idx; see gptq.py). `packing_format` says how qzeros is
stored, which is this format's quirk:
    "auto_round:auto_gptq"   zero - 1, GPTQ v1 style (auto-round writes this for symmetric schemes)
    "auto_round"             the zero point as is (auto-round's asymmetric export)
Config keys its loader (auto_round.inference.convert_model, reached through transformers'
AutoRoundQuantizer) reads: bits, group_size, sym, data_type, packing_format, block_name_to_quantize
(prefixes of the decoder blocks whose Linears are quantized) and extra_config (per-layer differences:
{"bits": 16} for a Linear left unquantized inside a block, full settings for one quantized outside).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import Tensor

from ..packing import PackedWeight, default_g_idx
from ..scheme import QuantScheme
from .base import FORMATS, log_consumers, partial_group_reason
from .gptq import _GPTQTensors

log = logging.getLogger(__name__)

_BLOCK_RE = re.compile(r"^(.*?)\.\d+\.")  # "model.layers.3.mlp.up_proj" -> "model.layers"


def block_prefix(name: str) -> str | None:
    m = _BLOCK_RE.match(name)
    return m.group(1) if m else None


@FORMATS.register("auto_round")
class AutoRound(_GPTQTensors):
    name = "auto_round"
    quant_method = "auto-round"

    def prepare(self, layers: dict[str, PackedWeight]) -> dict[str, Any]:
        for name, pw in layers.items():
            if pw.g_idx is not None and not torch.equal(pw.g_idx.cpu(), default_g_idx(pw.in_features, pw.scheme)):
                raise ValueError(f"{name}: act-order weights with a permuted g_idx cannot be written in the "
                                 "auto_round format (its loader reads no g_idx); use --format gptq or wq")
        # auto-round's inference backends keep layers with a partial group as plain Linear and fail to load;
        # vLLM reads auto-round checkpoints with its GPTQ/Marlin kernels, which need whole groups too
        partial = partial_group_reason(layers)
        who = log_consumers(self.name, {"wq.load": None, "auto-round": partial, "vllm": partial}, log)
        all_sym = all(pw.scheme.sym for pw in layers.values())
        if all_sym:  # symmetric zero = 2**(b-1) >= 1, so zero-1 always fits
            return {"packing_format": "auto_round:auto_gptq", "consumers": who}
        log.info("asymmetric layers: auto_round export stores exact zero points (packing_format auto_round)")
        return {"packing_format": "auto_round", "consumers": who}

    def layer_tensors(self, pw: PackedWeight, options: dict[str, Any]) -> dict[str, Tensor]:
        tensors = super().layer_tensors(pw, options)
        del tensors["g_idx"]  # auto-round writes none (always i // group here, checked in prepare)
        return tensors

    def zero_offset(self, options: dict[str, Any]) -> int:
        return 1 if "gptq" in options.get("packing_format", "") else 0  # auto_gptq packing stores zero - 1

    def options_from_config(self, qconfig: dict[str, Any]) -> dict[str, Any]:
        return {"packing_format": qconfig.get("packing_format", "auto_round:auto_gptq")}

    def quantization_config(self, quant: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        main = QuantScheme.parse(quant["scheme"])
        layers = {n: QuantScheme.parse(s) for n, s in quant["layers"].items()}
        blocks = sorted({p for p in map(block_prefix, layers) if p})
        extra: dict[str, dict[str, Any]] = {}
        for n, s in layers.items():
            if block_prefix(n) not in blocks:  # quantized outside the blocks (e.g. lm_head override)
                extra[n] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "data_type": "int"}
            elif s != main:
                extra[n] = {k: v for k, v in (("bits", s.bits), ("group_size", s.group_size), ("sym", s.sym))
                            if v != getattr(main, k)}
        for n in quant.get("unquantized") or []:
            if block_prefix(n) in blocks:  # a Linear inside a block that stays in full precision
                extra[n] = {"bits": 16, "data_type": "float"}
        args = quant.get("algo_args") or {}
        cfg: dict[str, Any] = {
            "quant_method": "auto-round",
            "packing_format": options["packing_format"],
            "bits": main.bits,
            "group_size": main.group_size,
            "sym": main.sym,
            "data_type": "int",
            "block_name_to_quantize": ",".join(blocks),
        }
        if extra:
            cfg["extra_config"] = extra
        if quant.get("algo") == "autoround":  # the tuning settings auto-round itself records
            cfg.update({k: args[k] for k in ("iters", "nsamples", "seqlen", "lr") if args.get(k) is not None})
        try:
            from importlib.metadata import version

            cfg["autoround_version"] = version("auto-round")
        except Exception:  # auto-round not installed: the key is informational
            pass
        return cfg

    def layer_schemes(self, qconfig: dict[str, Any], names: list[str]) -> dict[str, QuantScheme]:
        main = QuantScheme(bits=int(qconfig["bits"]), group_size=int(qconfig.get("group_size", -1)),
                           sym=bool(qconfig.get("sym", True))).validate()
        extra = qconfig.get("extra_config") or {}
        out = {}
        for n in names:
            over = extra.get(n) or next((v for k, v in extra.items() if _regex_hit(k, n)), {})
            out[n] = QuantScheme(bits=int(over.get("bits", main.bits)),
                                 group_size=int(over.get("group_size", main.group_size)),
                                 sym=bool(over.get("sym", main.sym))).validate()
        return out


def _regex_hit(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False
