"""compressed-tensors `pack-quantized` checkpoints: vLLM's route for 2/3-bit and asymmetric weights.

Per Linear (layout of the installed compressed_tensors 0.20, checked by a round trip through its own
decompressor in tests/test_formats_compressed_tensors.py):
    weight_packed       int32 [out, ceil(in*b/32)]    codes packed along the input dim, a dense
                                                      little-endian bit stream: value j of each run of
                                                      32 sits at bits [j*b, (j+1)*b) of the run's b
                                                      words (3-bit values straddle words); trailing
                                                      words that hold no value are dropped
    weight_scale        [out, n_groups]               one scale per group (fp16 as wq computed it)
    weight_zero_point   int32 [ceil(out*b/32), n_groups]  asymmetric only, packed along the OUTPUT dim
    weight_shape        int64 [2] = (out, in)
compressed-tensors thinks in signed codes: q_ct = q - 2**(b-1), zp_ct = zero - 2**(b-1), and packs
q_ct + 2**(b-1). So the stored words hold exactly wq's unsigned codes and zero points; only the
orientation and the truncation differ from wq's GPTQ-style PackedWeight. Symmetric schemes store no
zero point (it is 2**(b-1) in wq's terms).

What reads it (logged at export and recorded in wq.json "consumers"):
    wq.load                  every layer
    compressed-tensors       its pack-quantized decompressor: when in_features % group_size == 0
    transformers             (CompressedTensorsHfQuantizer) the same, and symmetric only with
                             compressed-tensors 0.20 (its loader sizes packed zero points wrongly)
    vLLM                     symmetric 2..8 bits, zero points (asymmetric) at 4/8 bits only, and
                             in_features % group_size == 0
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import Tensor

from ..packing import PackedWeight, default_g_idx, pack, packed_size, unpack
from ..scheme import QuantScheme
from .base import FORMATS, Format, log_consumers, partial_group_reason

log = logging.getLogger(__name__)


def ct_words(n: int, bits: int) -> int:
    """int32 words compressed-tensors keeps for n codes: ceil(n*b/32) (wq pads to a multiple of 32 codes)."""
    return -(-n * bits // 32)


def _pad_rows(words: Tensor, rows: int) -> Tensor:
    """[r, ...] -> [rows, ...] with zero words appended (the codes they hold are padding)."""
    if words.shape[0] == rows:
        return words
    pad = words.new_zeros((rows - words.shape[0],) + tuple(words.shape[1:]))
    return torch.cat([words, pad], 0)


def _weights_args(s: QuantScheme) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs for a weight scheme, as its model_dump writes them."""
    return {
        "num_bits": s.bits,
        "type": "int",
        "symmetric": s.sym,
        "group_size": None if s.group_size == -1 else s.group_size,
        "strategy": "channel" if s.group_size == -1 else "group",
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def consumers(layers: dict[str, PackedWeight]) -> dict[str, str | None]:
    """Which readers can load a pack-quantized checkpoint of these layers: name -> None (yes) or why not."""
    why_partial = partial_group_reason(layers)
    asym_odd = sorted({str(pw.scheme) for pw in layers.values() if not pw.scheme.sym and pw.scheme.bits not in (4, 8)})
    vllm = why_partial
    if asym_odd:
        vllm = (f"vLLM serves zero points (asymmetric) at 4/8 bits only, not {', '.join(asym_odd)}; use -sym"
                + (f"; also {why_partial}" if why_partial else ""))
    hf = why_partial
    if hf is None and any(not pw.scheme.sym for pw in layers.values()):
        # seen with compressed-tensors 0.20 + transformers 5.23: on load it sizes weight_zero_point
        # unpacked, [out, n_groups], while its own compressor writes (and decompressor reads) it packed
        hf = ("transformers' compressed-tensors loader (0.20) sizes asymmetric zero points unpacked and "
              "rejects packed ones; use -sym, or wq.load / vLLM")
    return {"wq.load": None, "compressed-tensors": why_partial, "transformers": hf, "vllm": vllm}


@FORMATS.register("compressed-tensors")
class CompressedTensors(Format):
    name = "compressed-tensors"
    quant_method = "compressed-tensors"

    def why_not(self, scheme: QuantScheme) -> str | None:
        if not scheme.is_int:
            return f"pack-quantized stores integer weights; write {scheme} with compressed-tensors' float formats"
        return None

    def prepare(self, layers: dict[str, PackedWeight]) -> dict[str, Any]:
        for name, pw in layers.items():
            if pw.g_idx is not None and not torch.equal(pw.g_idx.cpu(), default_g_idx(pw.in_features, pw.scheme)):
                raise ValueError(f"{name}: act-order weights with a permuted g_idx cannot be written as "
                                 "compressed-tensors pack-quantized here; use --format gptq or wq, or "
                                 "quantize with static groups")
        return {"consumers": log_consumers(self.name, consumers(layers), log)}

    def layer_tensors(self, pw: PackedWeight, options: dict[str, Any]) -> dict[str, Tensor]:
        b = pw.scheme.bits
        out = {
            # [packed_size(in), out] -> [out, ceil(in*b/32)]: same bit stream, transposed, trailing words cut
            "weight_packed": pw.qweight[: ct_words(pw.in_features, b)].t().contiguous(),
            "weight_scale": pw.scales.t().contiguous(),  # [out, n_groups]
            "weight_shape": torch.tensor([pw.out_features, pw.in_features], dtype=torch.int64),
        }
        if not pw.scheme.sym:
            zp = pack(pw.zeros.t().to(torch.int32), b, dim=0)  # [out, ng] -> [packed_size(out), ng]
            out["weight_zero_point"] = zp[: ct_words(pw.out_features, b)].contiguous()
        return out

    def read_layer(self, tensors, scheme, in_features, out_features, qconfig) -> PackedWeight:
        b = scheme.bits
        shape = tuple(int(v) for v in tensors["weight_shape"].tolist())
        if shape != (out_features, in_features):
            raise ValueError(f"weight_shape {shape} does not match the model's Linear ({out_features}, {in_features})")
        packed = tensors["weight_packed"].to(torch.int32)
        if packed.shape != (out_features, ct_words(in_features, b)):
            raise ValueError(f"weight_packed shape {tuple(packed.shape)} does not match {scheme} for "
                             f"[{out_features}, {in_features}] (expected ({out_features}, {ct_words(in_features, b)}))")
        qweight = _pad_rows(packed.t().contiguous(), packed_size(in_features, b))
        n_groups = scheme.n_groups(in_features)
        if scheme.sym:
            zeros = torch.full((n_groups, out_features), 2 ** (b - 1), dtype=torch.uint8)
        else:
            zp = _pad_rows(tensors["weight_zero_point"].to(torch.int32), packed_size(out_features, b))
            zeros = unpack(zp, b, out_features, dim=0).t().to(torch.uint8)  # [n_groups, out]
        return PackedWeight(qweight=qweight, scales=tensors["weight_scale"].t().to(torch.float16).contiguous(),
                            zeros=zeros.contiguous(), scheme=scheme, in_features=in_features,
                            out_features=out_features)

    def quantization_config(self, quant: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        main = QuantScheme.parse(quant["scheme"])
        layers = {n: QuantScheme.parse(s) for n, s in quant["layers"].items()}
        groups: dict[QuantScheme, list[str]] = {}
        for n, s in layers.items():
            groups.setdefault(s, []).append(n)
        config_groups = {}
        for i, (s, names) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0] != main, str(kv[0])))):
            # the main scheme targets every Linear; other schemes name their layers exactly. A layer in two
            # groups would be ambiguous, so with mixed schemes every group names its layers.
            targets = ["Linear"] if len(groups) == 1 else sorted(names)
            config_groups[f"group_{i}"] = {"targets": targets, "weights": _weights_args(s),
                                           "input_activations": None, "output_activations": None,
                                           "format": "pack-quantized"}
        cfg = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            # Linears left in full precision (lm_head...): "Linear" must not claim them
            "ignore": sorted(quant.get("unquantized") or (quant.get("report") or {}).get("skipped") or []),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
        }
        try:
            import compressed_tensors

            cfg["version"] = compressed_tensors.__version__
        except ImportError:
            pass
        return cfg

    def layer_schemes(self, qconfig: dict[str, Any], names: list[str]) -> dict[str, QuantScheme]:
        ignore = qconfig.get("ignore") or []
        out = {}
        for n in names:
            if any(_matches(t, n) for t in ignore):
                continue
            for group in (qconfig.get("config_groups") or {}).values():
                if any(t == "Linear" or _matches(t, n) for t in group.get("targets", [])):
                    out[n] = _scheme_from_args(group["weights"])
                    break
            else:
                raise ValueError(f"{n}: no config_groups entry targets this layer")
        return out


def _matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _scheme_from_args(w: dict[str, Any]) -> QuantScheme:
    if w.get("type", "int") != "int":
        raise ValueError(f"compressed-tensors weights of type {w.get('type')!r} are not integer; wq reads int only")
    strategy = w.get("strategy")
    group = -1 if strategy in ("channel", "tensor") or not w.get("group_size") else int(w["group_size"])
    return QuantScheme(bits=int(w["num_bits"]), group_size=group, sym=bool(w.get("symmetric", True))).validate()
