"""The real model (SmolLM2-135M) at W4G128 and W3G128, exported in every format, reloaded through every
consumer available here, with matching logits. 576 % 128 != 0, so q/k/v/o/gate/up have a partial group."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import wq

pytestmark = pytest.mark.slow
FORMATS = ["wq", "gptq", "auto_round", "compressed-tensors"]


@pytest.fixture(scope="module")
def ids(real_tokenizer, pride_text):
    return real_tokenizer(pride_text[5000:6000], return_tensors="pt").input_ids[:, :48]


@pytest.fixture(scope="module", params=["W4G128", "W3G128"])
def exported(request, _real_model_pristine, tmp_path_factory):
    import copy

    model = copy.deepcopy(_real_model_pristine).float()
    wq.quantize_model(model, request.param, progress=False)
    out = tmp_path_factory.mktemp(request.param) / "out"
    dirs = wq.save(model, out, format=FORMATS)
    return request.param, {d.name: d for d in dirs}


def test_every_format_reloads_in_wq_with_identical_logits(exported, ids):
    scheme, dirs = exported
    ref = wq.load(dirs["wq"], dtype=torch.float32)(ids).logits
    for name in FORMATS[1:]:  # every format holds the same PackedWeights
        torch.testing.assert_close(wq.load(dirs[name], dtype=torch.float32)(ids).logits, ref, rtol=0, atol=0)


def test_from_pretrained_native_equals_wq_load(exported, ids):
    scheme, dirs = exported
    hf = AutoModelForCausalLM.from_pretrained(dirs["wq"], dtype=torch.float32)
    torch.testing.assert_close(hf(ids).logits, wq.load(dirs["wq"], dtype=torch.float32)(ids).logits, rtol=0, atol=0)


def test_partial_groups_are_reported_for_readers_that_cannot_take_them(exported):
    """576 % 128 != 0: auto-round's loader and compressed-tensors/vLLM refuse such layers; wq says so."""
    scheme, dirs = exported
    ar = json.loads((dirs["auto_round"] / "wq.json").read_text())["consumers"]
    ct = json.loads((dirs["compressed-tensors"] / "wq.json").read_text())["consumers"]
    assert "in=576" in ar["auto-round"] and "in=576" in ct["compressed-tensors"] and "in=576" in ct["vllm"]
    assert ar["wq.load"] is None and ct["wq.load"] is None


def test_compressed_tensors_decompressor(exported):
    """compressed_tensors' own decompressor on every layer it can take (in % 128 == 0: down_proj)."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    scheme, dirs = exported
    d = dirs["compressed-tensors"]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["version"] == ct.__version__
    meta = json.loads((d / "wq.json").read_text())
    assert "576" in meta["consumers"]["vllm"] and meta["consumers"]["wq.load"] is None
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k not in (
        "quant_method", "version", "sparsity_config", "transform_config")})
    group = next(iter(parsed.config_groups.values()))
    state = load_file(str(d / "model.safetensors"))
    ours = wq.load(d, dtype=torch.float32)
    checked = 0
    for i in range(30):
        name = f"model.layers.{i}.mlp.down_proj"
        t = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        w = PackedQuantizationCompressor.decompress(t, group)["weight"]
        torch.testing.assert_close(w.float(), ours.get_submodule(name).packed.dequantize(torch.float16).float(),
                                   rtol=0, atol=0)
        checked += 1
    assert checked == 30


def test_libraries_load_the_whole_real_model_at_g64(_real_model_pristine, tmp_path, ids):
    """With a group that divides 576 (G64, symmetric) compressed-tensors' transformers loader and auto-round's
    loader take the whole real model, and their logits match wq's."""
    import copy

    pytest.importorskip("compressed_tensors")
    pytest.importorskip("auto_round")
    model = copy.deepcopy(_real_model_pristine).float()
    wq.quantize_model(model, "W4G64", progress=False)
    dirs = {d.name: d for d in wq.save(model, tmp_path / "o", format=["compressed-tensors", "auto_round"])}
    ref = model(ids).logits
    d = dirs["compressed-tensors"]
    assert json.loads((d / "wq.json").read_text())["consumers"]["transformers"] is None
    theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(theirs, ref, rtol=0, atol=1e-4)
    ar = torch.nn.Module.float(AutoModelForCausalLM.from_pretrained(dirs["auto_round"], dtype=torch.float32))
    name = "model.layers.3.mlp.gate_proj"
    w = torch.nn.Module.half(ar.get_submodule(name))(torch.eye(576, dtype=torch.float16)).t()
    torch.testing.assert_close(w, model.get_submodule(name).packed.dequantize(torch.float16), rtol=1e-3, atol=1e-5)
    a = ar(ids).logits
    assert (a - ref).abs().max() < 0.02 * ref.abs().max()  # auto-round dequantizes in fp16 on CPU
    assert (a.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
