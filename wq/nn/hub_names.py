"""Module names <-> the tensor names of the original Hub checkpoint.

transformers 5 renames some checkpoint keys on load and fuses per-expert tensors into 3-D parameters
(its conversion mapping: e.g. Mixtral's `block_sparse_moe.experts.3.w1.weight` and `...w3.weight`
become rows of `mlp.experts.gate_up_proj`). wq's QuantExperts has one sub-module per expert, so
its state dict is per expert again; `HubNames` maps those module names to the names the original
checkpoint used (what vLLM, SGLang and GPTQModel read for quantized MoE) and back, using
transformers' own mapping for the model. Models without a mapping (gpt-oss and Llama 4, whose Hub
checkpoints are fused) keep wq's names: `...experts.{e}.{gate,up,down}_proj`.
"""

from __future__ import annotations

import logging

from torch import nn

from .experts import QuantExperts, find_fused_experts, fused_layout

log = logging.getLogger(__name__)


def _conversions(model: nn.Module) -> list:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # transformers 4.x: checkpoints and modules share names
        return []
    try:
        convs = get_model_conversion_mapping(model, add_legacy=False)
    except Exception as e:  # a model class transformers cannot map: keep module names, say so
        log.debug("no conversion mapping for %s: %s", type(model).__name__, e)
        return []
    return [c for c in convs if not isinstance(c, PrefixChange)]


class HubNames:
    """to_hub(key) / from_hub(key) for state-dict keys of `model` (with fused or unfused experts)."""

    def __init__(self, model: nn.Module):
        from_transformers = _conversions(model)
        try:
            from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming
        except ImportError:
            WeightConverter = WeightRenaming = MergeModulelist = ()  # noqa: N806
        self._renames = [c for c in from_transformers if WeightRenaming and isinstance(c, WeightRenaming)]
        self._reverse = [c.reverse_transform() for c in self._renames[::-1]]
        merges = [c for c in from_transformers if WeightConverter and isinstance(c, WeightConverter)
                  and any(isinstance(op, MergeModulelist) for op in c.operations)]
        self.module_to_hub: dict[str, str] = {}  # "model.layers.1.mlp.experts.3.gate_proj" -> hub prefix
        experts = {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)}
        experts.update({n: m for n, m in find_fused_experts(model).items() if fused_layout(m) is not None})
        for path, mod in experts.items():
            lay = mod.layout if isinstance(mod, QuantExperts) else fused_layout(mod)
            up = ("gate_proj", "up_proj") if lay.gated else ("up_proj",)
            for fused, projs in ((f"{path}.{'gate_up_proj' if lay.gated else 'up_proj'}", up),
                                 (f"{path}.down_proj", ("down_proj",))):
                patterns = self._hub_patterns(fused, len(projs), merges) or [f"{path}.*.{p}" for p in projs]
                for e in range(lay.num_experts):
                    for proj, pattern in zip(projs, patterns):
                        hub = self._apply(pattern.replace("*", str(e)), self._reverse)
                        self.module_to_hub[f"{path}.{e}.{proj}"] = hub
        self.hub_to_module = {v: k for k, v in self.module_to_hub.items()}

    @staticmethod
    def _apply(key: str, renames: list) -> str:
        if not renames:
            return key
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(key, renames)

    @staticmethod
    def _hub_patterns(fused_key: str, n_parts: int, merges: list) -> list[str] | None:
        """The per-expert Hub prefixes (with `*` for the expert index) of a fused parameter, one per
        part in storage order (gate, up), from the converter that merges them on load; None if none does."""
        for conv in merges:
            rev = conv.reverse_transform()
            name, pattern = rev.rename_source_key(fused_key)
            targets = list(rev._original_target_patterns)
            if pattern is None or len(targets) != n_parts or targets[0] not in name:
                continue
            parts = [name.replace(targets[0], t) for t in targets]
            if all(p.endswith(".weight") and "*" in p for p in parts):
                return [p[: -len(".weight")] for p in parts]
        return None

    def to_hub(self, key: str) -> str:
        owner, _, leaf = key.rpartition(".")
        hub = self.module_to_hub.get(owner)
        return f"{hub}.{leaf}" if hub is not None else self._apply(key, self._reverse)

    def from_hub(self, key: str) -> str:
        owner, _, leaf = key.rpartition(".")
        mod = self.hub_to_module.get(owner)
        if mod is not None:
            return f"{mod}.{leaf}"
        return self._apply(key, self._renames)

    def hub_module(self, name: str) -> str:
        """A module name (e.g. "model.layers.1.mlp.experts.3.gate_proj") as the Hub checkpoint names it."""
        return self.to_hub(name + ".x")[:-2]

    def module_of(self, hub_name: str) -> str:
        """The inverse of hub_module."""
        return self.from_hub(hub_name + ".x")[:-2]

    @property
    def identity(self) -> bool:
        """True when every name is the module's own (dense models without a mapping)."""
        return not self._renames and all(k == v for k, v in self.module_to_hub.items())
