"""A model on the meta device whose parts are filled from the checkpoint's shards when needed.

    sk = Skeleton(ShardReader.open(path))
    sk.load_outside()            # embeddings, final norm, head (sk.release_outside() drops them again)
    block = sk.load_block(3)     # block 3's tensors, read from whichever shards hold them
    ...                          # quantize it
    sk.release_block(3)          # back to the meta device: memory is about one block at a time

The module tree is transformers' own (built from config.json with parameters on the meta device and
buffers such as rotary tables real), so a block's forward is exactly the model's. Checkpoint names
are mapped to module names with HubNames (renamings, per-expert MoE tensors); fused experts stored
per expert become QuantExperts up front, fused 3-D checkpoint tensors are split when their block
loads. A checkpoint whose names cannot be mapped this way fails at construction, naming the tensors.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn  # noqa: F401

from ..heap import trim
from ..nn.experts import QuantExperts, find_fused_experts, fused_layout
from ..nn.hub_names import HubNames
from ..nn.surgery import set_module
from .shards import ShardReader

log = logging.getLogger(__name__)


class StreamError(ValueError):
    """This checkpoint cannot be streamed block by block (the message says why and what to do)."""


def empty_model(config, dtype: torch.dtype):
    """The model's module tree: parameters on the meta device (no memory), buffers (rotary tables) real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the one holding the most parameter elements."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and name and not isinstance(mod, QuantExperts):
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise StreamError(f"{type(model).__name__} has no list of decoder blocks to stream")
    return best


class Skeleton:
    """The meta-device model plus the map from its state-dict keys to the checkpoint's tensor names."""

    def __init__(self, reader: ShardReader, dtype: torch.dtype | None = None, config=None):
        from transformers import AutoConfig

        self.reader = reader
        if config is None:
            config = AutoConfig.from_pretrained(reader.path)
        if getattr(config, "quantization_config", None) is not None:
            qm = (config.quantization_config if isinstance(config.quantization_config, dict)
                  else config.quantization_config.to_dict()).get("quant_method")
            if qm != "fp8" or not reader.fp8_block:
                raise StreamError(f"{reader.path} is already quantized ({qm}); wq quantizes bf16/fp16/fp32 checkpoints "
                                  "and FP8 block-scaled ones")
            del config.quantization_config  # FP8 blocks are dequantized on read
        if dtype is None:
            dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if dtype not in (torch.bfloat16, torch.float16, torch.float32):
                dtype = torch.bfloat16
        self.config, self.dtype = config, dtype
        self.model = empty_model(config, dtype).eval()
        self.names = HubNames(self.model)
        module_of = {self.names.from_hub(n): n for n in reader.names()}
        # experts stored per expert in the checkpoint: per-expert modules now (their keys match then)
        for path, mod in find_fused_experts(self.model).items():
            if fused_layout(mod) is not None and any(k.startswith(f"{path}.0.") for k in module_of):
                set_module(self.model, path, QuantExperts.empty(mod, device="meta"))
        self.prefix, self.blocks = decoder_blocks(self.model)
        self.ckpt_of = module_of  # module key -> checkpoint name
        wanted = set(self.model.state_dict())
        tied = self._tied_keys()
        missing = sorted(k for k in wanted - set(module_of) - tied)
        if missing:
            raise StreamError(f"{reader.path}: {len(missing)} tensor(s) of the {type(self.model).__name__} module tree "
                              f"have no checkpoint tensor under the names wq maps (e.g. {missing[:3]}); stream with a "
                              "checkpoint saved by transformers, or pass --no-stream to load it whole")
        self.unused = sorted(set(module_of) - wanted)
        if self.unused:
            log.info("%d checkpoint tensor(s) belong to no module and are ignored (e.g. %s)", len(self.unused),
                     self.unused[0])

    # ------------------------------------------------------------------------------------- helpers
    def _tied_keys(self) -> set[str]:
        """State keys that share their tensor with another (a tied lm_head): read once, under the other name."""
        if not getattr(self.config, "tie_word_embeddings", False) and not getattr(
                getattr(self.config, "get_text_config", lambda: self.config)(), "tie_word_embeddings", False):
            return set()
        out = self.model.get_output_embeddings()
        if out is None:
            return set()
        name = next((n for n, m in self.model.named_modules() if m is out), None)
        return {f"{name}.weight"} if name else set()

    def block_name(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    def __len__(self) -> int:
        return len(self.blocks)

    def _read(self, keys, want: dict[str, Tensor], device, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Checkpoint tensors for module keys, cast per tensor to the skeleton's dtype (fp32 routers stay
        fp32), or to `dtype` for every floating tensor (fp32 for calibration)."""
        out = {}
        for k in keys:
            t = self.reader.get(self.ckpt_of[k], device)
            dt = dtype or want[k].dtype
            out[k] = t.to(dt) if t.is_floating_point() and t.dtype != dt else t
        return out

    def _load_into(self, module: nn.Module, prefix: str, device, dtype: torch.dtype | None = None) -> None:
        want = {k: v for k, v in module.state_dict().items()}
        local = {k for k in want if f"{prefix}{k}" in self.ckpt_of}
        sd = {k[len(prefix):]: v for k, v in self._read([prefix + k for k in local],
                                                         {prefix + k: want[k] for k in local}, device,
                                                         dtype).items()}
        module.load_state_dict(sd, strict=False, assign=True)
        still = [n for n, p in module.named_parameters() if p.device.type == "meta"]
        if still:
            raise StreamError(f"{prefix}: no checkpoint tensor for {still[:3]}")

    # ------------------------------------------------------------------------------------- loading
    def load_outside(self, device: str | torch.device = "cpu") -> None:
        """Everything outside the decoder blocks (embeddings, final norm, head), once; ties the head."""
        keys = [k for k in self.model.state_dict() if not k.startswith(self.prefix + ".") and k in self.ckpt_of]
        want = self.model.state_dict()
        sd = self._read(keys, want, device)
        self.model.load_state_dict(sd, strict=False, assign=True)
        if self._tied_keys():
            self.model.tie_weights()
        left = [n for n, p in self.model.named_parameters() if p.device.type == "meta"
                and not n.startswith(self.prefix + ".")]
        if left:
            raise StreamError(f"{self.reader.path}: no checkpoint tensor for {left[:3]}")

    def release_outside(self) -> None:
        """Drop the tensors outside the blocks (back to the meta device) until load_outside reads them again:
        a calibrated run needs them for capturing the first block's inputs and at the end, not in between."""
        for name, mod in self.model.named_modules():
            if name == self.prefix or name.startswith(self.prefix + "."):
                continue
            for pname, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                          requires_grad=p.requires_grad)
        trim()  # the embedding is often the largest tensor of the run: its pages go back now

    def load_block(self, i: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
        """Block i with its tensors read from the shards (on `device`, floating tensors in `dtype` if given,
        else the skeleton's); returns the block module."""
        block = self.blocks[i]
        self._load_into(block, f"{self.block_name(i)}.", device, dtype)
        return block

    def release_block(self, i: int) -> None:
        """Drop block i's tensors (back to the meta device) and give the freed heap back (wq/heap.py)."""
        self.blocks[i].to("meta")
        trim()

    def block_bytes(self, i: int = 0) -> int:
        """Bytes of block i in the skeleton's dtype."""
        return sum(p.numel() * p.element_size() for p in self.blocks[i].parameters())
