"""Save/load: exact tensor layouts and logits equality for every format wq writes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import wq
from wq.formats import FORMATS
from wq.nn import QuantLinear
from wq.packing import unpack


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("scheme", ["W4G128", "W3G128", "W2G128", "W8G-1", "W4G-1", "W4G32-asym", "W3G64-sym"])
@pytest.mark.parametrize("fmt", ["gptq", "wq"])
def test_save_load_logits_equal_tiny(tiny_model, tmp_path, scheme, fmt):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    wq.quantize_model(tiny_model, scheme, progress=False)
    ref = _logits(tiny_model, ids)
    wq.save(tiny_model, tmp_path / "out", format=fmt)
    loaded = wq.load(tmp_path / "out", dtype=torch.float32)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14  # 7 Linears x 2 blocks
    assert torch.equal(_logits(loaded, ids), ref)


def test_gptq_v1_layout_and_zero_minus_one(tiny_model, tmp_path):
    wq.quantize_model(tiny_model, "W4G32", progress=False)  # symmetric: zero 8 everywhere
    wq.save(tiny_model, tmp_path / "o", format="gptq")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (4, 32, True, False)
    st = load_file(str(tmp_path / "o" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # in 160 -> 5 groups of 32, out 64
    assert st[f"{name}.qweight"].shape == (160 * 4 // 32, 64) and st[f"{name}.qweight"].dtype == torch.int32
    assert st[f"{name}.qzeros"].shape == (5, 64 * 4 // 32)
    assert st[f"{name}.scales"].shape == (5, 64) and st[f"{name}.scales"].dtype == torch.float16
    assert torch.equal(st[f"{name}.g_idx"], torch.arange(160, dtype=torch.int32) // 32)
    assert (unpack(st[f"{name}.qzeros"], 4, 64, dim=1) == 7).all()  # v1 stores zero - 1
    assert "lm_head.weight" not in st  # tied to the embedding, stored once


def test_asym_with_zero_point_zero_goes_v2(tiny_model, tmp_path):
    with torch.no_grad():  # an all-positive row forces zero point 0 at 2-bit asym
        tiny_model.model.layers[0].mlp.up_proj.weight[0].abs_()
    wq.quantize_model(tiny_model, "W2G32", progress=False)
    wq.save(tiny_model, tmp_path / "o", format="gptq")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq_v2"
    st = load_file(str(tmp_path / "o" / "model.safetensors"))
    z = unpack(st["model.layers.0.mlp.up_proj.qzeros"], 2, 160, dim=1)
    assert (z[:, 0] == 0).all()  # stored as is in v2


def test_several_formats_write_subdirs_and_wq_json(tiny_model, tmp_path):
    wq.quantize_model(tiny_model, "W4G64", progress=False, override=["down_proj=W8G-1"])
    dirs = wq.save(tiny_model, tmp_path / "o", format=["gptq", "wq"], config={"note": "test"})
    assert [d.name for d in dirs] == ["gptq", "wq"]
    meta = json.loads((tmp_path / "o" / "wq" / "wq.json").read_text())
    assert meta["layers"]["model.layers.1.mlp.down_proj"] == "W8G-1"
    assert meta["layers"]["model.layers.1.mlp.up_proj"] == "W4G64"
    assert {"wq", "torch", "transformers"} <= set(meta["versions"])
    assert meta["recipe"] == {"note": "test"}
    # mixed precision survives a reload, in both formats
    for d in dirs:
        m = wq.load(d)
        assert m.get_submodule("model.layers.1.mlp.down_proj").scheme.bits == 8
        assert m.get_submodule("model.layers.1.mlp.up_proj").scheme.group_size == 64


def test_gptq_without_wq_json_reads_config(tiny_model, tmp_path):
    wq.quantize_model(tiny_model, "W3G32", progress=False)
    ids = torch.randint(0, 256, (1, 9))
    ref = _logits(tiny_model, ids)
    wq.save(tiny_model, tmp_path / "o", format="gptq")
    (tmp_path / "o" / "wq.json").unlink()  # as if another tool had written it
    assert torch.equal(_logits(wq.load(tmp_path / "o", dtype=torch.float32), ids), ref)


def test_save_is_atomic_and_refuses_existing(tiny_model, tmp_path, monkeypatch):
    wq.quantize_model(tiny_model, "W4G128", progress=False)
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # an empty directory would be filled
    with pytest.raises(FileExistsError, match="overwrite"):
        wq.save(tiny_model, out)

    import wq.writing.shards as shards

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "_append", disk_full)  # the disk fills while a shard is being written
    with pytest.raises(OSError, match="No space"):
        wq.save(tiny_model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp dir left behind


def test_save_needs_quantized_model_and_load_names_problems(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="quantize_model"):
        wq.save(tiny_model, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="config.json"):
        wq.load(tmp_path)


def test_format_registry():
    assert {"gptq", "wq"} <= set(FORMATS.names())


def test_real_model_round_trip(real_model, real_tokenizer, tmp_path):
    ids = real_tokenizer("The capital of France is", return_tensors="pt").input_ids
    wq.quantize_model(real_model, "W4G128", progress=False)
    ref = _logits(real_model, ids)
    wq.save(real_model, tmp_path / "o", format="gptq", tokenizer=real_tokenizer)
    loaded = wq.load(tmp_path / "o")
    assert torch.equal(_logits(loaded, ids), ref)


def _llama(hidden, inter):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                                        num_attention_heads=5 if hidden % 5 == 0 else 4, num_key_value_heads=1,
                                        vocab_size=128, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "auto_round"])
def test_consumers_come_from_the_real_shapes(tmp_path, fmt, caplog):
    """in_features 100 and 200: no group of 32-256 divides them (the hint must not suggest one); every GPTQ-style
    export records that vLLM cannot load it."""
    model = _llama(100, 200)
    wq.quantize_model(model, "W4G128", progress=False)
    with caplog.at_level("WARNING"):
        wq.save(model, tmp_path / "o", format=fmt)
    vllm = json.loads((tmp_path / "o" / "wq.json").read_text())["consumers"]["vllm"]
    assert "in_features 100, 200" in vllm and "no group size divides them: use G-1" in vllm and "576" not in vllm
    assert "will NOT load in vllm" in caplog.text
    model = _llama(128, 320)  # 320 = 2.5 groups of 128, whole groups of 64 and 32
    wq.quantize_model(model, "W4G128", progress=False)
    wq.save(model, tmp_path / "p", format=fmt)
    vllm = json.loads((tmp_path / "p" / "wq.json").read_text())["consumers"]["vllm"]
    assert "in=320" in vllm and "use G64 or G32" in vllm
    model = _llama(128, 256)
    wq.quantize_model(model, "W4G128", progress=False)
    wq.save(model, tmp_path / "q", format=fmt)
    assert json.loads((tmp_path / "q" / "wq.json").read_text())["consumers"]["vllm"] is None
