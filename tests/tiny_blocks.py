"""Tiny decoder blocks with calibration data, for the block-algorithm and transform tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def linears(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def tiny_block(arch: str = "llama", hidden: int = 160, inter: int = 288, seed: int = 0, batches: int = 3,
               batch: int = 2, T: int = 24, heads: int = 4, kv_heads: int = 2):
    """(block fp32, inputs, kwargs, targets): `batches` calibration batches of [batch, T, hidden].

    Weights get heavier tails than the init and the norms non-trivial scales, as trained models have.
    """
    if arch == "llama":
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer as Layer
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rotary
    else:
        from transformers import Qwen2Config as Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer as Layer
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rotary
    torch.manual_seed(seed)
    cfg = Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 head_dim=hidden // heads)
    cfg._attn_implementation = "sdpa"
    block = Layer(cfg, 0).float().eval()
    with torch.no_grad():
        for n, p in block.named_parameters():
            if "norm" in n:
                p.mul_(0.5 + torch.rand_like(p))
            else:
                p.add_(0.02 * torch.randn_like(p).pow(3))
    rot = Rotary(cfg)
    pos = torch.arange(T)[None]
    inputs = [torch.randn(batch, T, hidden) * (1 + 4 * (torch.arange(hidden) % 17 == 0)) for _ in range(batches)]
    kwargs = [{"position_embeddings": rot(inputs[0], pos), "position_ids": pos, "attention_mask": None}
              for _ in inputs]
    with torch.no_grad():
        targets = [out(block(x, **kw)) for x, kw in zip(inputs, kwargs)]
    return block, inputs, kwargs, targets


def block_mse(block: nn.Module, weights: dict[str, torch.Tensor], inputs, kwargs, targets) -> float:
    with torch.no_grad():
        errs = [torch.nn.functional.mse_loss(out(functional_call(block, weights, (x,), kw)), y)
                for x, kw, y in zip(inputs, kwargs, targets)]
    return float(sum(errs) / len(errs))


def result_weights(results) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": r.packed.dequantize() for n, r in results.items()}
