"""What share of a model's weights was quantized, by kind, and every block weight that was not (and why).

Counted: weight matrices (parameters and QuantLinear's packed weights with two or more dimensions,
counted as the [out, in] numel they stand for). Vectors (norms, biases, router biases) are not
weights here. A tied lm_head counts once, as the embedding. Kinds: attention, mlp (dense MLPs and
shared experts), experts (routed MoE experts), embeddings/head, other (routers, anything else).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .experts import QuantExperts, find_fused_experts, fused_layout
from .quant_linear import QuantLinear

KINDS = ("attention", "mlp", "experts", "embeddings/head", "other")
WARN_BELOW = 0.99  # share of the decoder blocks' weights under which the CLI warns (--strict: fails)

_EMBED = re.compile(r"(^|\.)(embed\w*|wte|wpe|lm_head|embed_out|word_embeddings|output)(\.|$)")
_ROUTED = re.compile(r"(^|\.)experts(\.|$)")
_ATTN = re.compile(r"(attn|attention|self_attention|mixer|linear_attn)(\.|$)")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn|shared_experts?|block_sparse_moe|moe)(\.|$)")
_ROUTER = re.compile(r"(^|\.)(gate|router|shared_experts?_gate)$")


def weight_kind(module_name: str) -> str:
    """The kind of the weight held by the module of this name."""
    if _EMBED.search(module_name):
        return "embeddings/head"
    if _ROUTER.search(module_name):
        return "other"
    if _ROUTED.search(module_name):
        return "experts"
    if _ATTN.search(module_name):
        return "attention"
    if _MLP.search(module_name):
        return "mlp"
    return "other"


def decoder_blocks(model: nn.Module) -> str | None:
    """The qualified name of the ModuleList of decoder blocks: the one holding the most parameters."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and name and not isinstance(mod, QuantExperts):
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = name, n
    return best


@dataclass
class Coverage:
    by_kind: dict[str, dict[str, int]] = field(default_factory=lambda: {k: {"quantized": 0, "kept": 0} for k in KINDS})
    block_quantized: int = 0
    block_kept: int = 0
    kept_in_blocks: dict[str, str] = field(default_factory=dict)  # tensor name -> reason

    @property
    def block_share(self) -> float:
        total = self.block_quantized + self.block_kept
        return self.block_quantized / total if total else 1.0

    @property
    def model_share(self) -> float:
        q = sum(v["quantized"] for v in self.by_kind.values())
        total = q + sum(v["kept"] for v in self.by_kind.values())
        return q / total if total else 1.0

    def to_dict(self) -> dict:
        return {**{k: dict(v) for k, v in self.by_kind.items()}, "blocks_share": round(self.block_share, 6),
                "model_share": round(self.model_share, 6), "kept_in_blocks": dict(self.kept_in_blocks)}

    def warning(self) -> str | None:
        """A message naming what was left unquantized in the blocks when under WARN_BELOW, else None."""
        if self.block_share >= WARN_BELOW:
            return None
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.kept_in_blocks.items():
            by_reason.setdefault(reason, []).append(name)
        parts = [f"{len(names)} x {reason} (e.g. {names[0]})" for reason, names in
                 sorted(by_reason.items(), key=lambda kv: -len(kv[1]))]
        return (f"only {self.block_share:.1%} of the decoder blocks' weights were quantized; left as they were: "
                + "; ".join(parts))

    def table(self) -> str:
        rows = [f"{'weights':<16} {'quantized':>14} {'kept':>14} {'share':>7}"]
        for kind in KINDS:
            v = self.by_kind[kind]
            total = v["quantized"] + v["kept"]
            if total:
                rows.append(f"{kind:<16} {v['quantized']:>14,} {v['kept']:>14,} {v['quantized'] / total:>7.1%}")
        rows.append(f"{'decoder blocks':<16} {self.block_quantized:>14,} {self.block_kept:>14,} {self.block_share:>7.1%}")
        return "\n".join(rows)


def coverage(model: nn.Module, plan: dict | None = None, skipped: dict[str, str] | None = None) -> Coverage:
    """Count quantized and kept weight matrices of `model`. QuantLinear weights count as quantized, and
    so do the names in `plan` (so the share is known before the work starts); `skipped` is the
    planner's {name: reason}, used to say why a kept weight was kept."""
    from .surgery import linear_candidates

    plan, skipped = plan or {}, skipped or {}
    blocks = decoder_blocks(model)
    cov = Coverage()

    def add(tensor_name: str, module_name: str, numel: int, quantized: bool, reason: str = "") -> None:
        kind = weight_kind(module_name)
        cov.by_kind[kind]["quantized" if quantized else "kept"] += numel
        if blocks and tensor_name.startswith(blocks + "."):
            if quantized:
                cov.block_quantized += numel
            else:
                cov.block_kept += numel
                cov.kept_in_blocks[tensor_name] = reason

    fused = find_fused_experts(model)
    handled = {n for n, m in fused.items() if fused_layout(m) is not None}
    seen: set[int] = set()  # parameter ids counted (a tied lm_head is the embedding's weight: once)
    for name, (n_in, n_out) in linear_candidates(model).items():
        w = getattr(_submodule(model, name), "weight", None)
        if w is not None:
            if id(w) in seen:
                continue
            seen.add(id(w))
        planned = name in plan
        add(f"{name}.weight", name, n_in * n_out, planned, "" if planned else skipped.get(name, "not planned"))
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            if name not in plan:
                add(f"{name}.weight", name, mod.in_features * mod.out_features, True)
            continue
        if name in handled:
            continue  # counted per expert projection above
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() < 2 or id(p) in seen or (pname == "weight" and _is_candidate(mod)):
                continue  # vectors, tied copies, and Linears (counted above)
            seen.add(id(p))
            if name in fused:
                reason = f"fused experts layout wq does not handle ({type(mod).__name__})"
            elif _ROUTER.search(name) or "Router" in type(mod).__name__:
                reason = "MoE router (kept in full precision by default)"
            elif isinstance(mod, nn.Embedding):
                reason = "embedding"
            else:
                reason = f"not a Linear ({type(mod).__name__}.{pname})"
            add(f"{name}.{pname}" if name else pname, name, p.numel(), False, reason)
    return cov


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:  # a projection of fused experts: no module of its own yet
        return None


def _is_candidate(module: nn.Module) -> bool:
    from .surgery import linear_shape

    return linear_shape(module) is not None
