"""Model-free rtn / FP8 / casts: tensor by tensor through the shards, no model object, and the same
checkpoint the in-memory path writes."""

from __future__ import annotations

import json

import pytest
import torch
import zoo
from safetensors.torch import load_file, save_file

import wq
from wq.loading.shards import ShardReader
from wq.model_free import ModelFreeError, cast_model_free, check, plan_tensors, quantize_model_free


@pytest.mark.parametrize("arch,scheme,fmt", [("llama", "W4G128", "gptq"), ("qwen3_moe", "W4G32", "compressed-tensors"),
                                             ("mixtral", "W3G64", "wq"), ("llama", "FP8", "compressed-tensors")])
def test_model_free_equals_in_memory(arch, scheme, fmt, tmp_path):
    src = tmp_path / "src"
    zoo.build(arch).save_pretrained(src, max_shard_size="60KB")
    quantize_model_free(src, scheme, tmp_path / "mf", formats=[fmt], progress=False)
    model = type(zoo.build(arch)).from_pretrained(src).eval()
    wq.quantize_model(model, scheme, progress=False)
    wq.save(model, tmp_path / "mem", format=fmt)
    a, b = zoo.checkpoint_tensors(tmp_path / "mf"), zoo.checkpoint_tensors(tmp_path / "mem")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "mf" / "wq.json").read_text())
    assert meta["model_free"] and meta["coverage"]["blocks_share"] > 0.99
    q = json.loads((tmp_path / "mf" / "config.json").read_text())["quantization_config"]
    r = json.loads((tmp_path / "mem" / "config.json").read_text())["quantization_config"]
    # the same config, except that without the model every router weight is listed as kept (harmless to readers)
    assert {k: v for k, v in q.items() if k not in ("version", "ignore")} == {
        k: v for k, v in r.items() if k not in ("version", "ignore")}
    assert set(r.get("ignore", [])) <= set(q.get("ignore", []))


def test_names_decide_what_is_a_linear(tmp_path):
    src = tmp_path / "src"
    zoo.build("qwen2_moe").save_pretrained(src)
    plan, skipped = plan_tensors(ShardReader(src), "W4G128")
    assert "model.layers.0.mlp.experts.2.down_proj" in plan and "model.layers.0.self_attn.q_proj" in plan
    assert "model.layers.0.mlp.gate" in skipped and "model.layers.0.mlp.shared_expert_gate" in skipped
    assert not any("embed" in n or "norm" in n for n in plan)
    for arch in ("gpt2", "gpt_oss"):  # transposed Conv1D weights, fused 3-D experts: the model's code decides
        d = tmp_path / arch
        zoo.build(arch).save_pretrained(d)
        with pytest.raises(ModelFreeError):
            check(ShardReader(d))


def test_fp16_cast_audits_weights_and_refuses_overflow(tmp_path):
    src = tmp_path / "src"
    zoo.build("llama").save_pretrained(src)
    cast_model_free(src, "FP16", tmp_path / "ok", progress=False)
    a = zoo.checkpoint_tensors(tmp_path / "ok")
    ref = load_file(str(src / "model.safetensors"))
    assert all(torch.equal(a[k], ref[k].to(torch.float16)) for k in ref)
    audit = json.loads((tmp_path / "ok" / "fp16_audit.json").read_text())
    assert audit["ok"] and "not audited" in audit["activations"]
    ref["model.layers.1.mlp.up_proj.weight"][0, 0] = 70000.0  # beyond FP16's 65504
    save_file(ref, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="inf"):
        cast_model_free(src, "FP16", tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    cast_model_free(src, "FP16", tmp_path / "forced", progress=False, force=True)
    assert json.loads((tmp_path / "forced" / "fp16_audit.json").read_text())["ok"] is False


def test_cli_takes_the_model_free_path_for_rtn(tmp_path, caplog):
    import logging

    from wq.quantize import main

    src = tmp_path / "src"
    zoo.build("llama").save_pretrained(src)
    with caplog.at_level(logging.INFO):
        assert main([str(src), "--scheme", "W4G128", "-o", str(tmp_path / "o"), "--no-progress"]) == 0
    assert any("model-free" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "o" / "wq.json").read_text())["model_free"] is True


def test_plain_tensors_are_never_read_into_memory(tmp_path, monkeypatch):
    """Embeddings and norms go from the source shards to the checkpoint file to file; only the weights that
    are quantized are read (the embedding of a 405B model is 2 GiB)."""
    from wq.loading.shards import ShardFile, ShardReader

    src = tmp_path / "src"
    zoo.build("llama").save_pretrained(src, max_shard_size="60KB")
    read = []
    real_get, real_file_get = ShardReader.get, ShardFile.get
    monkeypatch.setattr(ShardReader, "get", lambda self, n, *a, **k: read.append(n) or real_get(self, n, *a, **k))
    monkeypatch.setattr(ShardFile, "get", lambda self, n: read.append(n) or real_file_get(self, n))
    quantize_model_free(src, "W4G128", tmp_path / "mf", progress=False)
    assert read and all(n.endswith(".weight") and ".layers." in n and "norm" not in n or
                        n.endswith(("qweight", "scales", "zeros")) for n in read), read
    assert not [n for n in read if "embed" in n]
