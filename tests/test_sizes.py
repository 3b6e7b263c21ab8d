"""Checkpoint sizes from the config and the safetensors headers, before any weight is loaded."""

import pytest
import torch
from conftest import make_tiny_llama

import wq
from wq.plan.sizes import (
    block_bytes,
    calibration_bytes,
    estimate_checkpoint,
    meta_model,
    model_tensors,
    packed_linear_bytes,
    peak_disk_bytes,
)
from wq.scheme import QuantScheme


def _dir_bytes(d):
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


@pytest.mark.parametrize("scheme,fmt", [("W4G32", "gptq"), ("W3G32", "compressed-tensors"), ("W8G-1", "wq"),
                                        ("W2G64", "auto_round"), ("FP8", None)])
def test_estimate_matches_what_save_writes(tmp_path, scheme, fmt):
    src = tmp_path / "src"
    model = make_tiny_llama(hidden=128, inter=320, vocab=512, tie=False).to(torch.bfloat16)
    model.save_pretrained(src)
    est = estimate_checkpoint(src, scheme)  # lm_head skipped by default, as the run does
    wq.quantize_model(model, scheme, progress=False)
    out = wq.save(model, tmp_path / "out", format=fmt)[0]
    tensors = (out / "model.safetensors").stat().st_size
    assert est.quantized_layers == 14
    assert abs((est.quantized_bytes + est.kept_bytes) - tensors) / tensors < 0.03, (est, tensors)
    assert est.checkpoint_bytes >= _dir_bytes(out)  # small files are covered


def test_headers_and_config_agree(tmp_path):
    src = tmp_path / "src"
    make_tiny_llama().to(torch.bfloat16).save_pretrained(src)
    from_headers = model_tensors(src)  # what the files hold
    (src / "model.safetensors").unlink()  # as for a Hub id: only the config is local
    from_config = model_tensors(src)
    for name, t in from_headers.items():
        assert from_config[name].shape == t.shape and from_config[name].nbytes == t.nbytes, name
    blocks = block_bytes(from_headers)
    assert list(blocks) == ["model.layers.0", "model.layers.1"]
    per_block = sum(t.nbytes for n, t in from_headers.items() if n.startswith("model.layers.0."))
    assert blocks["model.layers.0"] == per_block


def test_packed_bytes_and_overrides(tmp_path):
    s = QuantScheme.parse("W4G128")
    # 576 inputs (4.5 groups of 128 -> 5), 1536 outputs: qweight 18*4 rows, qzeros 5 x 192 words
    assert packed_linear_bytes(1536, 576, s) == 18 * 4 * 1536 * 4 + 5 * 48 * 4 * 4 + 5 * 1536 * 2 + 576 * 4
    src = tmp_path / "src"
    make_tiny_llama().save_pretrained(src)
    base = estimate_checkpoint(src, "W4G32")
    more = estimate_checkpoint(src, "W4G32", override=["down_proj=W8G32"])
    kept = estimate_checkpoint(src, "W4G32", override=["down_proj=BF16"])
    assert more.quantized_bytes > base.quantized_bytes and kept.quantized_layers == base.quantized_layers - 2
    two = estimate_checkpoint(src, "W4G32", formats=2)
    assert two.checkpoint_bytes == 2 * base.checkpoint_bytes


def test_fused_experts_are_counted():
    from transformers import MixtralConfig

    cfg = MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, num_local_experts=4)
    # no weights anywhere: the config alone (what a Hub id with a cached config.json gives)
    est = estimate_checkpoint("unused-hub-id", "W4G32", model=meta_model(cfg))
    experts = 2 * 4 * (2 * packed_linear_bytes(96, 64, QuantScheme.parse("W4G32")) +
                       packed_linear_bytes(64, 96, QuantScheme.parse("W4G32")))
    assert est.quantized_bytes >= experts and est.quantized_layers >= 2 * 4 * 3


def test_peak_disk_adds_the_resume_directory(tmp_path):
    src = tmp_path / "src"
    make_tiny_llama().save_pretrained(src)
    plain = estimate_checkpoint(src, "W4G32")
    assert peak_disk_bytes(src, "W4G32") == plain.checkpoint_bytes
    acts = calibration_bytes(meta_model(str(src)), nsamples=16, seqlen=64, block_algo=False)
    assert peak_disk_bytes(src, "W4G32", calibration=(16, 64, False)) == (
        plain.checkpoint_bytes + plain.quantized_bytes + plain.kept_bytes + acts)


def test_calibration_bytes():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, max_position_embeddings=8192)
    assert calibration_bytes(cfg, nsamples=128, seqlen=2048, block_algo=False) == 2 * 128 * 2048 * 576 * 4
    assert calibration_bytes(cfg, nsamples=128, seqlen=2048, block_algo=True) == 4 * 128 * 2048 * 576 * 4
