"""--rotate: the rotated unquantized model computes the same logits, and its checkpoints load in plain
transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from wq.transforms import block_layout, rotate_model
from wq.transforms.hadamard import hadamard, random_orthogonal
from wq.transforms.layout import LayoutError


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 96, 160, 576, 896, 1280])
def test_hadamard_sizes(n):
    h = hadamard(n)
    assert h is not None
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [64, 100])  # 100: no Hadamard here, a random orthogonal matrix instead
def test_random_orthogonal_is_orthogonal_and_seeded(n):
    q = random_orthogonal(n, seed=3)
    torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, random_orthogonal(n, seed=3)) and not torch.equal(q, random_orthogonal(n, seed=4))


def _qwen2(tie: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).eval()


def _randomize_norms(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(0.2 + 2 * torch.rand_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", True)])
def test_logits_unchanged(arch, tie):
    model = _randomize_norms(make_tiny_llama(tie=tie) if arch == "llama" else _qwen2(tie)).double()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    rot = copy.deepcopy(model)
    info = rotate_model(rot, seed=1)
    assert info.untied_lm_head == tie and info.head_dim == 16 and info.residual == "hadamard"
    assert not torch.equal(rot.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        got = rot(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the norms compute in fp32 internally
    assert rot.config.tie_word_embeddings is False if tie else True


def test_rotated_checkpoints_load_in_plain_transformers(tmp_path):
    """The rotated model saved as is, and quantized (compressed-tensors, symmetric): transformers'
    from_pretrained reads both without wq and computes what wq computed."""
    from transformers import AutoModelForCausalLM

    import wq

    model = _randomize_norms(make_tiny_llama(tie=True)).float()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    rot = copy.deepcopy(model)
    rotate_model(rot)
    rot.save_pretrained(tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    assert plain.lm_head.weight.data_ptr() != plain.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref, rtol=1e-4, atol=1e-4)

    q = copy.deepcopy(model)
    wq.quantize_model(q, "W4G32", algo="rtn", rotate=True, progress=False)
    assert q.wq_quant["rotation"]["untied_lm_head"]
    wq.save(q, tmp_path / "ct", format="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    back = wq.load(tmp_path / "ct")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, back(ids).logits, rtol=1e-4, atol=1e-4)


def test_layout_of_llama_block_and_refusals():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = make_tiny_llama()
    lay = block_layout(model.model.layers[0])
    assert lay.attn_readers == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert lay.mlp_readers == ["mlp.gate_proj", "mlp.up_proj"]
    assert lay.writers == ["self_attn.o_proj", "mlp.down_proj"]
    assert lay.up_down == [("mlp.up_proj", "mlp.down_proj")]
    assert [(h.v, h.o, h.head_dim, h.n_heads, h.n_kv) for h in lay.heads] == [
        ("self_attn.v_proj", "self_attn.o_proj", 16, 4, 2)]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    assert block_layout(gpt2.transformer.h[0]).writers == ["attn.c_proj", "mlp.c_proj"]  # Conv1D, [in, out]
    with pytest.raises(LayoutError, match="RMSNorm"):
        rotate_model(gpt2)


def test_cli_rotate_loads_the_model_whole(tmp_path, caplog):
    """--rotate touches the embeddings, every block and the head, so the CLI takes the in-memory path (one log
    line saying why) instead of the model-free rtn or streamed one, and the checkpoint records the rotation."""
    import json
    import logging

    from wq.quantize import main

    make_tiny_llama(tie=True).save_pretrained(tmp_path / "m")
    out = tmp_path / "q"
    with caplog.at_level(logging.INFO, logger="wq"):
        assert main([str(tmp_path / "m"), "--scheme", "W4G32", "--rotate", "-o", str(out), "--no-progress"]) == 0
    whole = [r.getMessage() for r in caplog.records if "loading the model whole" in r.getMessage()]
    assert len(whole) == 1 and "--rotate" in whole[0]
    assert not any("model-free" in r.getMessage() or "streaming" in r.getMessage() for r in caplog.records)
    meta = json.loads((out / "wq.json").read_text())
    assert "untied_lm_head" in meta["rotation"] and not meta.get("streamed")
