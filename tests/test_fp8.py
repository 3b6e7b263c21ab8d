"""FP8 weight-only: quantization error bounds, reference kernel, formats, save/load, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import wq
from wq.fp8 import FP8_MAX, Fp8Weight, fp8_quantize, fp8_reference_matmul
from wq.nn import QuantLinear
from wq.scheme import QuantScheme, SchemeError


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("s", ["FP8", "FP8G32", "FP8-e5m2", "FP8G64-e5m2"])
def test_round_trip_error_bound(s):
    scheme = QuantScheme.parse(s)
    w = torch.randn(48, 256) * torch.logspace(-3, 1, 256)  # columns over four decades
    fw = fp8_quantize(w, scheme)
    assert fw.weight.dtype == (torch.float8_e4m3fn if scheme.fmt == "e4m3" else torch.float8_e5m2)
    assert fw.scale.shape == (48, scheme.n_groups(256)) and fw.scale.dtype == torch.float32
    w_hat = fw.dequantize()
    scale = fw.scale.repeat_interleave(fw.group, dim=1)
    mant = 3 if scheme.fmt == "e4m3" else 2
    tiny_step = {"e4m3": 2.0**-9, "e5m2": 2.0**-16}[scheme.fmt]
    # normal range: half an ulp relative (2^-(mant+1)); subnormal range: half the smallest step, absolute
    bound = torch.maximum(w.abs() * 2.0 ** -(mant + 1), scale * tiny_step / 2) * (1 + 1e-6)
    assert ((w_hat - w).abs() <= bound).all()
    # the group's largest value maps to the format max and comes back exactly (up to fp32 rounding)
    assert (fw.weight.float().abs().amax(dim=1) == FP8_MAX[scheme.fmt]).all()
    rel = (w_hat - w).norm() / w.norm()
    assert rel < (0.04 if scheme.fmt == "e4m3" else 0.08)


def test_group_scale_matters_only_past_the_normal_range():
    """A float format keeps relative precision over its normal range (E4M3: 448 / 2^-6 = 28672x), so a
    per-group scale helps only when a row spans more than that and small values fall into subnormals."""
    w = torch.randn(16, 256)
    errs = {}
    for outlier in (100.0, 1e6):
        w[:, 0] = outlier
        ch = (fp8_quantize(w, "FP8").dequantize() - w)[:, 32:].norm()
        gr = (fp8_quantize(w, "FP8G32").dequantize() - w)[:, 32:].norm()
        errs[outlier] = float(gr / ch)
    assert 0.7 < errs[100.0] < 1.3  # same relative precision either way
    assert errs[1e6] < 0.2  # per channel the small values flush or go subnormal


def test_reference_kernel_and_dispatch():
    w, x, b = torch.randn(24, 64), torch.randn(3, 5, 64), torch.randn(24)
    fw = fp8_quantize(w, "FP8G32")
    y = fp8_reference_matmul(x, fw, b)
    torch.testing.assert_close(y, x @ fw.dequantize().t() + b)
    q = QuantLinear.from_packed(fw, b)
    torch.testing.assert_close(q(x), y)
    assert wq.kernels.select(x, fw).name == "reference"  # integer kernels decline FP8 weights
    torch.testing.assert_close(q(x.to(torch.bfloat16)).float(), y, atol=0.1, rtol=0.02)
    q.to(torch.bfloat16)  # dtype moves must not touch the FP8 weight or its fp32 scale
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.dtype == torch.float32


def test_matches_compressed_tensors_decompressor():
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(16, 256)
    for s, strategy, gs in [("FP8", "channel", None), ("FP8G64", "group", 64)]:
        fw = fp8_quantize(w, s)
        args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, group_size=gs, symmetric=True)
        out = FloatQuantizationCompressor.decompress({"weight": fw.weight, "weight_scale": fw.scale},
                                                     QuantizationScheme(targets=["Linear"], weights=args))
        torch.testing.assert_close(out["weight"].float(), fw.dequantize(), rtol=0, atol=0)
    assert ct.__version__


@pytest.mark.parametrize("s,fmt", [("FP8", "compressed-tensors-fp8"), ("FP8G32", "compressed-tensors-fp8"),
                                   ("FP8G32-e5m2", "wq-fp8")])
def test_save_load_logits_equal(tmp_path, s, fmt):
    m = tiny()
    report = wq.quantize_model(m, s, progress=False)
    assert set(report.layers) and all(r.stats["clipped"] == 0 for r in report.layers.values())
    with torch.no_grad():
        ref = m(IDS).logits
    out = tmp_path / "ckpt"
    wq.save(m, out)
    meta = json.loads((out / "wq.json").read_text())
    assert meta["format"] == fmt
    loaded = wq.load(out)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, QuantLinear)
    assert isinstance(loaded.model.layers[0].mlp.up_proj.packed, Fp8Weight)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ref, rtol=0, atol=0)


def test_compressed_tensors_config_is_what_the_library_and_transformers_read(tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    m = tiny()
    wq.quantize_model(m, "FP8", progress=False)
    with torch.no_grad():
        ref = m(IDS).logits
    out = tmp_path / "ct"
    wq.save(m, out, format="compressed-tensors")  # the FP8 flavour is picked for FP8 schemes
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized" and qc["ignore"] == ["lm_head"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.config_groups["group_0"].weights.strategy == "channel"
    hf = AutoModelForCausalLM.from_pretrained(out)  # transformers + compressed-tensors decompress it
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, ref, rtol=0, atol=1e-5)


def test_clear_errors():
    w = torch.randn(8, 576)
    with pytest.raises(ValueError, match=r"in_features=576 is not a multiple of group_size=128.*FP8 \(per-channel\)"):
        fp8_quantize(w, "FP8G128", name="model.layers.0.mlp.up_proj")
    m = LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"q_proj: in_features=96 .*--skip"):
        wq.quantize_model(m, "FP8G64", progress=False)
    for bad in ("FP4", "FP8G48", "FP8-e3m4", "FP16G128"):
        with pytest.raises(SchemeError, match="BF16, FP16, FP8"):
            QuantScheme.parse(bad)
    with pytest.raises(SchemeError, match="unknown format"):
        QuantScheme(bits=8, fmt="e3m4").validate()
    with pytest.raises(ValueError, match="not an FP8 scheme"):
        fp8_quantize(w, "W8")


def test_fp8_refuses_calibrated_algorithms(monkeypatch):
    from wq.algorithms import ALGORITHMS
    from wq.algorithms.base import Algorithm

    class Calibrated(Algorithm):
        needs_calibration = True

    monkeypatch.setitem(ALGORITHMS._items, "calibrated-test", Calibrated)
    with pytest.raises(ValueError, match="no calibration; use --algo rtn"):
        wq.quantize_model(tiny(), "FP8", algo="calibrated-test")


def test_formats_refuse_what_they_cannot_store(tmp_path):
    m = tiny()
    wq.quantize_model(m, "FP8-e5m2", progress=False)
    with pytest.raises(ValueError, match="no E5M2"):
        wq.save(m, tmp_path / "a", format="compressed-tensors-fp8")
    with pytest.raises(ValueError, match="integer"):
        wq.save(m, tmp_path / "b", format="gptq")
