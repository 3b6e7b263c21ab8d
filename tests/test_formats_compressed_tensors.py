"""compressed-tensors pack-quantized: bit layout and config proven against the installed compressed_tensors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM

import wq
from wq.formats import FORMATS
from wq.formats.compressed_tensors import consumers
from wq.packing import PackedWeight
from wq.scheme import QuantScheme

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is in the dev extra")
from compressed_tensors.compressors.pack_quantized import (  # noqa: E402
    PackedQuantizationCompressor,
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

SCHEMES = ["W2G32", "W3G32", "W4G32", "W8G32", "W3G32-sym", "W4G32-asym", "W4G-1", "W3G-1"]


def _random_packed(scheme: str, out_f: int, in_f: int, seed: int = 0) -> PackedWeight:
    s = QuantScheme.parse(scheme)
    g = torch.Generator().manual_seed(seed)
    ng = s.n_groups(in_f)
    q = torch.randint(0, 2**s.bits, (out_f, in_f), generator=g)
    scale = torch.rand(out_f, ng, generator=g) * 0.02 + 1e-3
    zero = (torch.full((out_f, ng), 2 ** (s.bits - 1)) if s.sym
            else torch.randint(0, 2**s.bits, (out_f, ng), generator=g))
    return PackedWeight.from_codes(q, scale, zero.float(), s)


def _ct_scheme(pw: PackedWeight):
    """The QuantizationScheme compressed_tensors parses out of the config wq writes."""
    quant = {"scheme": str(pw.scheme), "layers": {"l": str(pw.scheme)}}
    cfg = FORMATS.get("compressed-tensors")().quantization_config(quant, {})
    parsed = QuantizationConfig.model_validate({k: v for k, v in cfg.items() if k not in (
        "quant_method", "version", "sparsity_config", "transform_config")})
    return next(iter(parsed.config_groups.values()))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("in_f", [96, 70])  # 70: a partial run of 32 codes (and a partial group)
def test_words_equal_compressed_tensors_packing(scheme, in_f):
    pw = _random_packed(scheme, 40, in_f)
    b = pw.scheme.bits
    t = FORMATS.get("compressed-tensors")().layer_tensors(pw, {})
    signed = (pw.codes() - 2 ** (b - 1)).to(torch.int8)  # compressed-tensors' signed codes
    assert torch.equal(t["weight_packed"], pack_to_int32(signed, b))
    assert torch.equal(unpack_from_int32(t["weight_packed"], b, torch.Size([40, in_f])), signed)
    if not pw.scheme.sym:
        zp = (pw.zeros.t().to(torch.int32) - 2 ** (b - 1)).to(torch.int8)  # [out, n_groups]
        assert torch.equal(t["weight_zero_point"], pack_to_int32(zp, b, packed_dim=0))
    else:
        assert "weight_zero_point" not in t


@pytest.mark.parametrize("scheme", SCHEMES)
def test_decompressor_gives_wq_weights(scheme):
    """compressed_tensors' own pack-quantized decompress == wq's dequantization, for every bit width."""
    pw = _random_packed(scheme, 64, 128, seed=1)
    t = FORMATS.get("compressed-tensors")().layer_tensors(pw, {})
    out = PackedQuantizationCompressor.decompress(dict(t), _ct_scheme(pw))
    torch.testing.assert_close(out["weight"].float(), pw.dequantize(torch.float16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressor_reproduces_wq_tensors(scheme):
    """Compressing wq's dequantized weights with wq's scale/zero in compressed_tensors gives wq's exact words."""
    pw = _random_packed(scheme, 64, 128, seed=2)
    b = pw.scheme.bits
    state = {"weight": pw.dequantize(torch.float32), "weight_scale": pw.scales.t().float()}
    if not pw.scheme.sym:
        state["weight_zero_point"] = (pw.zeros.t().to(torch.int32) - 2 ** (b - 1)).to(torch.int8)
    got = PackedQuantizationCompressor.compress(state, _ct_scheme(pw))
    ours = FORMATS.get("compressed-tensors")().layer_tensors(pw, {})
    assert torch.equal(got["weight_packed"], ours["weight_packed"])
    if not pw.scheme.sym:
        assert torch.equal(got["weight_zero_point"], ours["weight_zero_point"])


def _tiny(scheme: str, **over):
    model = make_tiny_llama(vocab=128)
    wq.quantize_model(model, scheme, progress=False, **over)
    return model


@pytest.mark.parametrize("scheme", ["W4G32", "W3G32-sym", "W2G-1-sym"])
def test_transformers_compressed_tensors_loader_matches_wq(scheme, tmp_path):
    """transformers' CompressedTensorsHfQuantizer (compressed_tensors decompressing) == wq.load, logits exact."""
    model = _tiny(scheme)
    out = wq.save(model, tmp_path / "o", format="compressed-tensors")[0]
    x = torch.randint(0, 128, (1, 16))
    ours = wq.load(out, dtype=torch.float32)(x).logits
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_mixed_schemes_config_and_reload_without_wq_json(tmp_path):
    model = _tiny("W4G32", override=["down_proj=W3G32", "lm_head=W8G32"])
    out = wq.save(model, tmp_path / "o", format="compressed-tensors")[0]
    (out / "wq.json").unlink()  # read the way a foreign checkpoint is read: config.json only
    x = torch.randint(0, 128, (1, 8))
    back = wq.load(out, dtype=torch.float32)
    assert back.wq_quant["layers"]["model.layers.0.mlp.down_proj"] == "W3G32"
    assert back.wq_quant["layers"]["lm_head"] == "W8G32"
    torch.testing.assert_close(back(x).logits, model.float()(x).logits, rtol=0, atol=1e-5)


def test_consumers_say_what_loads():
    w3 = {"a": _random_packed("W3G32", 32, 64)}
    w4 = {"a": _random_packed("W4G128", 32, 576)}  # SmolLM2's 576 is not a multiple of 128
    assert consumers(w3)["compressed-tensors"] is None and "4/8 bits" in consumers(w3)["vllm"]
    assert "576" in consumers(w4)["vllm"] and "576" in consumers(w4)["compressed-tensors"]
    assert consumers(w4)["wq.load"] is None
