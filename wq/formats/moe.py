"""What servers can do with quantized MoE experts (per-expert tensors of a QuantExperts).

vLLM and SGLang load per-expert checkpoint tensors into one fused MoE layer per block. For integer
weight-only schemes their fused-MoE kernels take 4- and 8-bit weights only (GPTQ-Marlin MoE: 4/8-bit
symmetric; the WNA16 MoE kernels otherwise); 2/3-bit experts have no fused-MoE path there. Every
expert of one layer must also share one scheme (one fused tensor per projection). Dense layers are
judged by each format's own consumer rules.
"""

from __future__ import annotations

import re

from ..packing import PackedWeight

_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.(gate_proj|up_proj|down_proj)$")


def moe_serving_reason(layers: dict[str, PackedWeight]) -> str | None:
    """Why vLLM / SGLang cannot serve these experts' layers, or None (also None when there are none)."""
    by_layer: dict[str, set[str]] = {}
    low: list[str] = []
    for name, pw in layers.items():
        m = _EXPERT.match(name)
        if m is None:
            continue
        by_layer.setdefault(m.group(1), set()).add(str(pw.scheme))
        if pw.scheme.is_int and pw.scheme.bits not in (4, 8):
            low.append(name)
    reasons = []
    if low:
        reasons.append(f"{len(low)} MoE expert projection(s) at {sorted({str(layers[n].scheme) for n in low})[0]}: "
                       f"fused-MoE kernels take 4/8-bit experts only (e.g. {low[0]}); use --override "
                       "'experts=W4G128' for a servable checkpoint")
    mixed = [p for p, s in by_layer.items() if len(s) > 1]
    if mixed:
        reasons.append(f"experts of one layer with different schemes (e.g. {mixed[0]}: "
                       f"{', '.join(sorted(by_layer[mixed[0]]))}): a fused-MoE layer holds one scheme")
    return "; ".join(reasons) or None
