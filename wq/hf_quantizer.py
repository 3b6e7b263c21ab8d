"""transformers integration: `AutoModelForCausalLM.from_pretrained(dir)` on wq's native checkpoints.

`import wq` registers `quant_method: "wq"` with transformers (a QuantizationConfigMixin subclass and an
HfQuantizer subclass): at once if transformers' quantizers are already imported, else the moment they
are (wq.hf_hook), so `import wq` does not pay for importing every transformers quantizer. Loading goes:
    before weights: each quantized nn.Linear (named in quantization_config["modules"]) becomes a
                    _PackedSlot whose buffers have the checkpoint's names, shapes and dtypes, so
                    transformers loads the tensors as they are (no cast of fp16 scales);
    after weights:  each slot is turned into wq's QuantLinear through the native format's read_layer
                    (the one place that knows the tensor layout), so forward runs wq's kernels.
Saving back through transformers is not supported: use wq.save.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import FORMATS
from .nn import QuantExperts, QuantLinear, linear_shape, set_module
from .nn.experts import find_fused_experts, fused_layout
from .nn.hub_names import HubNames
from .nn.surgery import linear_candidates
from .packing import packed_size
from .scheme import QuantScheme

log = logging.getLogger(__name__)

QUANT_METHOD = "wq"


class _PackedSlot(nn.Module):
    """Placeholder with the native checkpoint's tensors of one Linear, filled by transformers' loader."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        b, ng = scheme.bits, scheme.n_groups(in_features)
        self.register_buffer("qweight", torch.empty(packed_size(in_features, b), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(ng, packed_size(out_features, b), dtype=torch.int32))
        self.register_buffer("scales", torch.empty(ng, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        # not state: a shape-only stand-in for model code that reads `.weight` before loading (GPT-2's
        # _init_weights scales c_proj.weight)
        self.__dict__["weight"] = torch.empty(out_features, in_features, device="meta")


class WQConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a wq checkpoint (keys written by wq.formats.gptq.Native)."""

    def __init__(self, scheme: str = "W4G128", modules: dict[str, str] | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.scheme = scheme
        self.modules = dict(modules or {})
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class WQHfQuantizer(HfQuantizer):
    """Builds wq's QuantLinear for a pre-quantized wq checkpoint."""

    requires_calibration = True  # loads pre-quantized checkpoints only; quantize with wq.quantize_model

    def validate_environment(self, *args, **kwargs):
        return

    def _schemes(self, model) -> dict[str, QuantScheme]:
        """{module name: scheme} of the quantized layers (config names are the Hub checkpoint's)."""
        cfg = self.quantization_config.to_dict()
        names = HubNames(model)
        if cfg.get("modules"):
            return {names.module_of(n): QuantScheme.parse(s) for n, s in cfg["modules"].items()}
        candidates = [n for n in linear_candidates(model) if not n.endswith("lm_head")]
        return FORMATS.get("wq")().layer_schemes(cfg, candidates)

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            raise ValueError("quant_method 'wq' loads pre-quantized checkpoints only; quantize a model with "
                             "wq.quantize_model (or python -m wq.quantize) and save it with wq.save")
        schemes = self._schemes(model)
        for path, mod in find_fused_experts(model).items():  # per-expert tensors: per-expert modules
            if fused_layout(mod) is not None and any(n.startswith(path + ".") for n in schemes):
                set_module(model, path, QuantExperts.empty(mod, device="meta"))
        for name, scheme in schemes.items():
            shape = linear_shape(model.get_submodule(name))
            if shape is None:
                raise ValueError(f"wq checkpoint: {name} is quantized but is not a Linear in this model")
            with torch.device("meta"):
                slot = _PackedSlot(shape[0], shape[1], scheme, getattr(model.get_submodule(name), "bias", None)
                                   is not None)
            set_module(model, name, slot)
        log.info("wq: %d Linear layers load as QuantLinear", len(schemes))
        return model

    def update_weight_conversions(self, weight_conversions, model):
        """Per-expert checkpoint names load into QuantExperts' per-expert modules: the merges of
        per-expert tensors into fused 3-D parameters give way to renamings onto those modules."""
        from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming

        if not any(isinstance(m, QuantExperts) for m in model.modules()):
            return weight_conversions
        out = []
        for conv in weight_conversions:
            if not (isinstance(conv, WeightConverter) and any(isinstance(op, MergeModulelist) for op in conv.operations)):
                out.append(conv)
                continue
            target = conv._original_target_patterns[0]  # e.g. ".experts.gate_up_proj"
            head, _, fused = target.rpartition(".")
            projs = {"gate_up_proj": ("gate_proj", "up_proj"), "up_proj": ("up_proj",),
                     "down_proj": ("down_proj",)}.get(fused)
            sources = conv._original_source_patterns
            if projs is None or len(projs) != len(sources) or not all(s.endswith(".weight") and "*" in s for s in sources):
                out.append(conv)
                continue
            for source, proj in zip(sources, projs):
                hub = re.escape(source[: -len(".weight")]).replace(r"\*", r"(\d+)") + r"\."
                out.append(WeightRenaming(hub, f"{head}.\\1.{proj}."))
        return out

    def _process_model_after_weight_loading(self, model, **kwargs):
        fmt = FORMATS.get("wq")()
        qconfig = self.quantization_config.to_dict()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        slots = [(n, m) for n, m in model.named_modules() if isinstance(m, _PackedSlot)]
        for name, slot in slots:
            tensors = {k: getattr(slot, k) for k in ("qweight", "qzeros", "scales", "g_idx")}
            pw = fmt.read_layer(tensors, slot.scheme, slot.in_features, slot.out_features, qconfig)
            bias = None if slot.bias is None else slot.bias.to(dtype)
            set_module(model, name, QuantLinear.from_packed(pw, bias))
        model.wq_quant = {"scheme": qconfig.get("scheme"), "algo": qconfig.get("algo", "unknown"), "algo_args": {},
                          "layers": {n: str(s.scheme) for n, s in slots}, "report": None}
        return model

    def is_serializable(self, safe_serialization=None):
        return False  # save with wq.save

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> bool:
    """Register quant_method "wq" with transformers (idempotent). Returns whether it is registered."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return True
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(WQConfig)
    register_quantizer(QUANT_METHOD)(WQHfQuantizer)
    return True

