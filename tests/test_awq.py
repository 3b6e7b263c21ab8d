"""awq: the folded scales leave the unquantized block unchanged; the scaled weights quantize better than
the unscaled ones with the same quantizer; the export is a plain weight-only checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_blocks import block_mse, linears, out, result_weights, tiny_block

from wq.algorithms.autoround import autoround_block
from wq.algorithms.awq import awq_block, awq_transform_
from wq.algorithms.hessian import block_hessians
from wq.algorithms.recon import initial_results
from wq.scheme import QuantScheme


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 4)])  # grouped-query heads; biases on q/k/v
def test_folded_block_equals_original(arch, kv):
    block, inputs, kwargs, targets = tiny_block(arch, hidden=128, inter=224, kv_heads=kv)
    plan = dict.fromkeys(linears(block), QuantScheme.parse("W3G32"))
    scaled = copy.deepcopy(block)
    alphas = awq_transform_(scaled, plan, inputs, kwargs)
    assert any(a > 0 for a in alphas.values()), alphas  # something was scaled
    assert set(alphas) == {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"}
    assert not torch.equal(scaled.input_layernorm.weight, block.input_layernorm.weight) or alphas["input_layernorm"] == 0
    with torch.no_grad():
        for x, kw, y in zip(inputs, kwargs, targets):
            torch.testing.assert_close(out(scaled(x, **kw)), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["W3G32", "W4G32"])
def test_scaled_weights_quantize_better(scheme):
    """awq+rtn below rtn (min-max, as AWQ's own) and awq+gptq below gptq, on the block's output."""
    block, inputs, kwargs, targets = tiny_block(hidden=128, inter=224)
    plan = dict.fromkeys(linears(block), QuantScheme.parse(scheme))
    rtn = initial_results(block, plan, inputs, kwargs, targets, "rtn")
    gptq = initial_results(block, plan, inputs, kwargs, targets, "gptq")
    b1, b2 = copy.deepcopy(block), copy.deepcopy(block)
    awq_rtn = awq_block(b1, plan, inputs, kwargs, targets, quantizer="rtn")
    awq_gptq = awq_block(b2, plan, inputs, kwargs, targets, quantizer="gptq")
    e = {k: block_mse(b, result_weights(r), inputs, kwargs, targets)
         for k, b, r in (("rtn", block, rtn), ("gptq", block, gptq), ("awq_rtn", b1, awq_rtn), ("awq_gptq", b2, awq_gptq))}
    assert e["awq_rtn"] < 0.9 * e["rtn"], e
    assert e["awq_gptq"] < e["gptq"], e


def test_awq_with_a_learned_quantizer_beats_autoround():
    block, inputs, kwargs, targets = tiny_block(hidden=128, inter=224)
    plan = dict.fromkeys(linears(block), QuantScheme.parse("W2G32"))
    ar = autoround_block(block, plan, inputs, kwargs, targets, iters=30, batch_size=1, lr=0.02)
    from wq.algorithms.recon import Recon

    b = copy.deepcopy(block)
    res = awq_block(b, plan, inputs, kwargs, targets, quantizer="recon", inner=Recon(iters=30))
    assert block_mse(b, result_weights(res), inputs, kwargs, targets) < block_mse(
        block, result_weights(ar), inputs, kwargs, targets)


def test_clip_search_never_worse_than_minmax():
    from wq.algorithms.awq import clip_quantize
    from wq.algorithms.rtn import rtn_quantize

    block, inputs, kwargs, targets = tiny_block(hidden=128, inter=224)
    H = block_hessians(block, ["mlp.down_proj"], inputs, kwargs)["mlp.down_proj"]
    w = block.mlp.down_proj.weight.detach()
    for s in ("W2G32", "W3G64-sym", "W4G-1"):
        sch = QuantScheme.parse(s)
        clipped = clip_quantize(w, H, sch)
        E = w - rtn_quantize(w, sch).packed.dequantize()
        assert clipped.stats["loss"] <= float((E @ H * E).sum()) * (1 + 1e-6), s


def test_end_to_end_plain_checkpoint(tiny_model, tmp_path):
    import wq

    model = tiny_model.float()
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    wq.quantize_model(model, "W4G32", algo="awq", calib=calib, nsamples=8, seqlen=32, progress=False)
    wq.save(model, tmp_path / "q", format="gptq")
    back = wq.load(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(back(test).logits, model(test).logits, rtol=1e-4, atol=1e-4)
