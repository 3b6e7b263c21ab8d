"""auto_round format: read back by auto-round's own loader (transformers' AutoRoundQuantizer) and wq.load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM

import wq

pytest.importorskip("auto_round", reason="auto-round is in the dev extra")


def _tiny(scheme: str, **over):
    model = make_tiny_llama(vocab=128)
    wq.quantize_model(model, scheme, progress=False, **over)
    return model


def _auto_round_load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return torch.nn.Module.float(model)  # auto-round forces fp16 on CPU; compare in fp32


@pytest.mark.parametrize("scheme,packing", [("W4G32", "auto_round:auto_gptq"), ("W3G32", "auto_round"),
                                            ("W2G-1-sym", "auto_round:auto_gptq"), ("W8G32", "auto_round:auto_gptq")])
def test_auto_round_loader_matches_wq(scheme, packing, tmp_path):
    model = _tiny(scheme)
    out = wq.save(model, tmp_path / "o", format="auto_round")[0]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["packing_format"] == packing
    assert qc["block_name_to_quantize"] == "model.layers"
    theirs = _auto_round_load(out)
    ours = wq.load(out, dtype=torch.float32)
    # per layer: auto-round's QuantLinear applied to the identity gives W^T; it dequantizes in fp16
    eye = torch.eye(64, dtype=torch.float16)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        w_ours = ours.get_submodule(name).packed.dequantize(torch.float16)
        layer = theirs.get_submodule(name)
        assert "auto_round" in type(layer).__module__
        w_theirs = torch.nn.Module.half(layer)(eye).t()
        torch.testing.assert_close(w_theirs, w_ours, rtol=1e-3, atol=1e-4)
    x = torch.randint(0, 128, (1, 16))
    torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=0, atol=2e-3)


def test_mixed_and_unquantized_in_block_round_trip(tmp_path):
    model = _tiny("W4G32", override=["down_proj=W3G32", "o_proj=BF16"])
    out = wq.save(model, tmp_path / "o", format="auto_round")[0]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["extra_config"]["model.layers.0.self_attn.o_proj"] == {"bits": 16, "data_type": "float"}
    assert qc["extra_config"]["model.layers.1.mlp.down_proj"] == {"bits": 3, "sym": False}
    (out / "wq.json").unlink()  # read through the config only
    back = wq.load(out, dtype=torch.float32)
    assert back.wq_quant["layers"]["model.layers.1.mlp.down_proj"] == "W3G32"
    x = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(back(x).logits, model.float()(x).logits, rtol=0, atol=1e-5)
    theirs = _auto_round_load(out)
    assert isinstance(theirs.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    torch.testing.assert_close(theirs(x).logits, back(x).logits, rtol=0, atol=2e-3)
