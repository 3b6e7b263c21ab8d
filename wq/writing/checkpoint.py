"""One format's checkpoint directory, written part by part: the same code for a model in memory (one
part) and for a streamed run (one part per decoder block, read back from the staging area).

    w = FormatWriter(target, fmt, names, summaries)      # summaries: every quantized layer (PackedWeight or .summary())
    w.add(state, packed)                                 # plain tensors + quantized layers of one part
    w.finish(config_dict, quant, tokenizer=..., generation_config=..., recipe=..., extra=...)

Names: tensors arrive under module names and are written under the Hub checkpoint's (HubNames).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..formats.moe import moe_serving_reason
from ..nn.hub_names import HubNames
from ..packing import PackedWeight
from .shards import MAX_SHARD_BYTES, ShardWriter

log = logging.getLogger(__name__)

WQ_JSON = "wq.json"


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"wq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def wq_meta(quant: dict, config: Any, **fields) -> dict:
    """The common part of wq.json: scheme, algorithm, recipe, versions, report, creation time."""
    return {"scheme": quant["scheme"], "algo": quant["algo"],
            "recipe": config.to_dict() if hasattr(config, "to_dict") else config, "versions": versions(),
            "report": quant.get("report"), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **{k: quant[k] for k in ("rotation", "bits_budget") if quant.get(k) is not None}, **fields}


class FormatWriter:
    def __init__(self, target: Path, fmt, names: HubNames, summaries: dict[str, PackedWeight],
                 max_bytes: int = MAX_SHARD_BYTES):
        self.target, self.fmt, self.names = Path(target), fmt, names
        self.options = fmt.prepare(summaries)
        moe = moe_serving_reason(summaries)
        if moe:
            who = self.options.setdefault("consumers", {"wq.load": None})
            for server in ("vllm", "sglang"):
                who[server] = f"{who[server]}; {moe}" if who.get(server) else moe
            log.warning("%s export will NOT be served by vLLM/SGLang: %s", fmt.name, moe)
        self.shards = ShardWriter(self.target, max_bytes)

    def add(self, state: dict[str, torch.Tensor], packed: dict[str, PackedWeight],
            biases: dict[str, torch.Tensor] | None = None) -> None:
        """state: plain tensors by module key; packed: quantized layers by module name (biases by the same)."""
        to_hub = self.names.to_hub
        for key, t in state.items():
            self.shards.add(to_hub(key), t)
        for name, pw in packed.items():
            for suffix, t in self.fmt.layer_tensors(pw, self.options).items():
                self.shards.add(to_hub(f"{name}.{suffix}"), t)
            bias = (biases or {}).get(name)
            if bias is not None:
                self.shards.add(to_hub(f"{name}.bias"), bias)

    def finish(self, config: dict, quant: dict, *, unquantized: list[str], tokenizer=None, generation_config=None,
               recipe: Any = None, extra: dict | None = None) -> None:
        """config.json (with the format's quantization_config), generation config, tokenizer, wq.json."""
        self.shards.close()
        hub = self.names.hub_module
        quant = {**quant, "layers": {hub(n): s for n, s in quant["layers"].items()},
                 "unquantized": [hub(n) for n in unquantized]}
        cfg = dict(config)
        cfg["quantization_config"] = self.fmt.quantization_config(quant, self.options)
        (self.target / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        if generation_config is not None:
            try:
                generation_config.save_pretrained(self.target)
            except Exception as e:  # a bad generation config must not lose the checkpoint
                log.warning("generation_config not saved: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.target)
        meta = {"format": self.fmt.name, **wq_meta(quant, recipe, layers=quant["layers"], coverage=quant.get("coverage"),
                                                   consumers=self.options.get("consumers")), **(extra or {})}
        (self.target / WQ_JSON).write_text(json.dumps(meta, indent=2, default=str))
