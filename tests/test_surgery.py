import pytest
import torch

import wq
from wq.nn import QuantLinear, parse_overrides, plan_layers


def test_plan_skips_lm_head_and_applies_overrides(tiny_model):
    plan, skipped = plan_layers(tiny_model, "W4G128", override=["down_proj=W8G-1", r"layers\.1\.self_attn\.q_proj=BF16"])
    assert "lm_head" in skipped and "lm_head" not in plan
    assert str(plan["model.layers.0.mlp.down_proj"]) == "W8G-1"
    assert str(plan["model.layers.0.mlp.up_proj"]) == "W4G128"
    assert "model.layers.1.self_attn.q_proj" in skipped
    assert len(plan) == 13


def test_override_beats_default_skip_and_skip_patterns_add(tiny_model):
    plan, skipped = plan_layers(tiny_model, "W4G128", skip=["lm_head", "mlp"], override=["lm_head=W8G128"])
    assert "lm_head" in plan and not any("mlp" in n for n in plan)
    assert sum("mlp" in n for n in skipped) == 6


@pytest.mark.parametrize("bad", ["down_proj", "down_proj=W9", "([=W4G128"])
def test_bad_overrides(bad):
    with pytest.raises(ValueError):
        parse_overrides([bad])


def test_quantize_model_swaps_in_place_and_runs_any_dtype(tiny_model):
    ids = torch.randint(0, 256, (1, 8))
    report = wq.quantize_model(tiny_model, "W4G32", progress=False)
    assert len(report.layers) == 14 and list(report.skipped) == ["lm_head"]
    assert sum(isinstance(m, QuantLinear) for m in tiny_model.modules()) == 14
    assert isinstance(tiny_model.lm_head, torch.nn.Linear)
    outs = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with torch.no_grad():
            outs[dtype] = tiny_model.to(dtype)(ids).logits.float()
    assert torch.allclose(outs[torch.bfloat16], outs[torch.float32], atol=0.1, rtol=0.05)
    assert torch.allclose(outs[torch.float16], outs[torch.float32], atol=0.02, rtol=0.01)
    assert all(r.bytes_after < r.bytes_before / 2 for r in report.layers.values())


def test_quantize_model_refuses_float_and_empty_plans(tiny_model):
    with pytest.raises(ValueError, match="float"):
        wq.quantize_model(tiny_model, "FP16")
    with pytest.raises(ValueError, match="no Linear"):
        wq.quantize_model(tiny_model, "W4G128", skip=[".*"])


def test_dtype_moves_keep_the_stored_fp16_scales(tiny_model):
    wq.quantize_model(tiny_model, "W4G32", progress=False)
    ql = tiny_model.model.layers[0].mlp.up_proj
    before = ql.scales.clone()
    tiny_model.to(torch.bfloat16)
    assert ql.scales.dtype == torch.float16 and torch.equal(ql.scales, before)
    tiny_model.float()
    assert ql.scales.dtype == torch.float16


def test_quantized_under_inference_mode_runs(tiny_model):
    ids = torch.randint(0, 256, (1, 8))
    with torch.inference_mode():  # buffers made here are inference tensors: no version counter
        wq.quantize_model(tiny_model, "W4G32", progress=False)
        out = tiny_model(ids).logits
    assert torch.isfinite(out).all()
