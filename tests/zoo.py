"""Tiny random models of real architectures, built from the installed transformers' own config classes.

One entry per decoder family with a causal-LM head (dense, Conv1D and MoE); 2 blocks, hidden 64, so a
test can quantize, save and reload each in about a second. `build(arch)` returns the model in eval
mode with its fused 3-D expert weights and biases drawn at a realistic scale (transformers initialises
some of them to zero or not at all on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as T

H, L, V = 64, 2, 128
_COMMON = {"vocab_size": V, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 128, "intermediate_size": 96}
_MOE = {"num_experts_per_tok": 2}

ARCHS: dict[str, tuple[str, str, dict]] = {  # arch -> (config class, model class, config kwargs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": H, "n_layer": L, "n_head": 4, "n_positions": 128,
                                               "bos_token_id": 0, "eos_token_id": 0}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 96, "word_embed_proj_dim": H, "bos_token_id": 0,
                                            "eos_token_id": 0, "pad_token_id": 1}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"bos_token_id": 0, "eos_token_id": 0}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"num_kv_heads": 2, "new_decoder_architecture": True,
                                                     "bos_token_id": 0, "eos_token_id": 0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 0}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_MOE, "num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**_MOE, "num_experts": 4, "moe_intermediate_size": 32,
                                                           "shared_expert_intermediate_size": 48}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_MOE, "num_experts": 4, "moe_intermediate_size": 32,
                                                           "head_dim": 16}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        **_MOE, "n_routed_experts": 4, "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 1,
        "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
        "v_head_dim": 16, "rope_scaling": None}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {**_MOE, "num_local_experts": 4, "head_dim": 16}),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 1,
                                                              "intermediate_size_mlp": 96, "head_dim": 16,
                                                              "interleave_moe_layer_step": 1}),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text")


def config(arch: str):
    cfg_cls, _, extra = ARCHS[arch]
    kw = dict(_COMMON)
    if arch == "gpt2":
        kw = {"vocab_size": V}
    kw.update(extra)
    return getattr(T, cfg_cls)(**kw)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(T, ARCHS[arch][1])(config(arch))
    with torch.no_grad():
        for name, p in model.named_parameters():  # experts and their biases: a realistic spread, never 0
            if p.dim() == 3 or (".experts." in name and name.endswith("bias")):
                p.normal_(0.0, 0.05)
    return model.eval()


def checkpoint_tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint directory (sharded or not), by its stored name."""
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(d / f)))
    return out
