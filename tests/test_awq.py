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


def _gpt2_block():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=64, n_positions=32)).eval()
    block = model.transformer.h[0]
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-trivial LayerNorm scales and biases
    inputs = [torch.randn(2, 16, 64) for _ in range(3)]
    with torch.no_grad():
        targets = [out(block(x)) for x in inputs]
    plan = {n: QuantScheme.parse("W3G32") for n, m in block.named_modules() if type(m).__name__ == "Conv1D"}
    return block, inputs, [{}] * 3, targets, plan


def test_gpt2_layernorm_and_conv1d_fold_exactly():
    """LayerNorm (scale and bias) folds into Conv1D readers ([in, out] weights); GPT-2's GELU MLP is not a
    scaling site (only gated MLPs are)."""
    block, inputs, kwargs, targets, plan = _gpt2_block()
    scaled = copy.deepcopy(block)
    alphas = awq_transform_(scaled, plan, inputs, kwargs)
    assert set(alphas) == {"ln_1", "ln_2"}
    with torch.no_grad():
        for x, y in zip(inputs, targets):
            torch.testing.assert_close(out(scaled(x)), y, rtol=1e-5, atol=1e-5)
    res = awq_block(copy.deepcopy(block), plan, inputs, kwargs, targets)
    assert {n: tuple(r.packed.dequantize().shape) for n, r in res.items()} == {
        "attn.c_attn": (192, 64), "attn.c_proj": (64, 64), "mlp.c_fc": (256, 64), "mlp.c_proj": (64, 256)}


def test_recon_on_conv1d_block():
    from wq.algorithms.recon import recon_block

    block, inputs, kwargs, targets, plan = _gpt2_block()
    res = recon_block(block, plan, inputs, kwargs, targets, iters=10)
    st = next(iter(res.values())).stats
    assert st["loss"] < st["init_loss"]
    weights = {f"{n}.weight": r.packed.dequantize().t() for n, r in res.items()}  # Conv1D stores [in, out]
    assert block_mse(block, weights, inputs, kwargs, targets) == pytest.approx(st["loss"], rel=1e-4)
