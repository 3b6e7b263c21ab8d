"""autoround: signed-gradient rounding must beat round-to-nearest on a block's output error.

Real decoder blocks of the bundled SmolLM2 (576 hidden: partial last group at G128) with their real
inputs captured on Emma, plus a tiny block for every scheme, sym and asym, and the pipeline end to end.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from wq.algorithms import ALGORITHMS
from wq.algorithms.autoround import autoround_block
from wq.algorithms.rtn import rtn_quantize
from wq.scheme import QuantScheme

N_SAMPLES, SEQLEN = 4, 256


def _linears(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def _block_mse(block, weights: dict[str, torch.Tensor], inputs, kwargs, targets) -> float:
    with torch.no_grad():
        errs = [torch.nn.functional.mse_loss(_out(functional_call(block, weights, (x,), kw)), y)
                for x, kw, y in zip(inputs, kwargs, targets)]
    return float(sum(errs) / len(errs))


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _rtn_weights(block, plan):
    return {f"{n}.weight": rtn_quantize(block.get_submodule(n).weight, s).packed.dequantize() for n, s in plan.items()}


def _ar_weights(results):
    return {f"{n}.weight": r.packed.dequantize() for n, r in results.items()}


@pytest.fixture(scope="module")
def real_blocks(real_model_dir):
    """{layer: (block fp32, inputs, kwargs, targets)} captured on Emma for blocks 0 and 15."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wq.assets import load_book

    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    ids = torch.tensor(tok(load_book("emma")[:60000])["input_ids"][: N_SAMPLES * SEQLEN]).view(N_SAMPLES, SEQLEN)
    out = {}
    for layer in (0, 15):
        block = model.model.layers[layer]
        cap = []

        def hook(module, args, kw, cap=cap):
            cap.append((args[0].detach(), {k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")}))
            raise StopIteration

        h = block.register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
            for i in range(N_SAMPLES):
                try:
                    model(ids[i : i + 1], use_cache=False)
                except StopIteration:
                    pass
        h.remove()
        inputs, kwargs = [c[0] for c in cap], [c[1] for c in cap]
        with torch.no_grad():
            targets = [_out(block(x, **kw)) for x, kw in zip(inputs, kwargs)]
        out[layer] = (block, inputs, kwargs, targets)
    return out


@pytest.mark.parametrize(
    "layer,scheme,ratio",
    [
        (0, "W4G128", 0.8),
        (0, "W3G128", 0.7),
        (0, "W2G128", 0.7),
        (15, "W3G128", 0.85),
        pytest.param(15, "W4G128", 0.9, marks=pytest.mark.slow),
        pytest.param(15, "W2G128", 0.8, marks=pytest.mark.slow),
    ],
)
def test_real_block_loss_below_rtn(real_blocks, layer, scheme, ratio):
    block, inputs, kwargs, targets = real_blocks[layer]
    sch = QuantScheme.parse(scheme)
    plan = {n: sch for n in _linears(block)}
    before = {k: v.clone() for k, v in block.state_dict().items()}
    results = autoround_block(block, plan, inputs, kwargs, targets, iters=12, batch_size=2, seed=0)
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in before.items()), "block weights were modified"
    ar = _block_mse(block, _ar_weights(results), inputs, kwargs, targets)
    rtn = _block_mse(block, _rtn_weights(block, plan), inputs, kwargs, targets)
    assert ar < ratio * rtn, (scheme, layer, ar, rtn)
    stats = next(iter(results.values())).stats
    assert stats["best_loss"] <= stats["rtn_loss"]


def _tiny_block(hidden: int = 160, inter: int = 288, seed: int = 0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4)
    cfg._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(cfg, 0).float().eval()
    for p in block.parameters():  # trained-looking weights: heavier tails than the init
        p.data = p.data + 0.02 * torch.randn_like(p).pow(3)
    rot = LlamaRotaryEmbedding(cfg)
    T = 24
    pos = torch.arange(T)[None]
    inputs = [torch.randn(2, T, hidden) for _ in range(3)]  # batches of 2 samples
    kwargs = [{"position_embeddings": rot(inputs[0], pos), "position_ids": pos, "attention_mask": None}
              for _ in inputs]
    with torch.no_grad():
        targets = [_out(block(x, **kw)) for x, kw in zip(inputs, kwargs)]
    return block, inputs, kwargs, targets


# hidden 160: G128 leaves a partial last group of 32; inter 288: 2.25 groups
@pytest.mark.parametrize("scheme", ["W4G-1", "W4G128", "W3G128", "W2G128", "W4G128-asym", "W3G128-sym", "W2G128-sym"])
def test_tiny_block_every_scheme(scheme):
    block, inputs, kwargs, targets = _tiny_block()
    sch = QuantScheme.parse(scheme)
    plan = {n: sch for n in _linears(block)}
    results = autoround_block(block, plan, inputs, kwargs, targets, iters=30, batch_size=2)
    ar = _block_mse(block, _ar_weights(results), inputs, kwargs, targets)
    rtn = _block_mse(block, _rtn_weights(block, plan), inputs, kwargs, targets)
    assert ar < 0.9 * rtn, (scheme, ar, rtn)
    for n, r in results.items():
        w = block.get_submodule(n).weight
        assert r.packed.scheme == sch and (r.packed.out_features, r.packed.in_features) == tuple(w.shape)
        q = r.packed.codes()
        assert int(q.min()) >= 0 and int(q.max()) <= sch.maxq
        assert 0 < r.error < 1
        if sch.sym:
            assert torch.all(r.packed.zeros == 2 ** (sch.bits - 1))


@pytest.mark.parametrize("scheme", ["W4G128", "W3G128", "W2G128-sym", "W4G-1"])
def test_zero_iterations_is_round_to_nearest(scheme):
    """With V = 0 and unit range multipliers the codes, scales and zeros are exactly RTN's."""
    block, inputs, kwargs, targets = _tiny_block()
    sch = QuantScheme.parse(scheme)
    plan = {n: sch for n in _linears(block)}
    results = autoround_block(block, plan, inputs, kwargs, targets, iters=0)
    for n, r in results.items():
        ref = rtn_quantize(block.get_submodule(n).weight, sch).packed
        assert torch.equal(r.packed.qweight, ref.qweight), n
        assert torch.equal(r.packed.scales, ref.scales) and torch.equal(r.packed.zeros, ref.zeros), n


def test_registered_and_end_to_end_on_tiny_model(tiny_model):
    """quantize_model(..., algo="autoround") through the block pipeline: QuantLinear everywhere, closer
    logits than RTN."""
    import copy

    from wq import quantize_model
    from wq.nn import QuantLinear

    cls = ALGORITHMS.get("autoround")
    assert cls.needs_calibration and cls.granularity == "block"
    model = tiny_model.float()
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(test).logits
    ar_model, rtn_model = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(ar_model, "W2G32", algo="autoround", calib=calib, nsamples=8, seqlen=32, batch_size=4,
                   iters=40, progress=False)
    quantize_model(rtn_model, "W2G32", algo="rtn", progress=False)
    assert all(not isinstance(m, nn.Linear) or "lm_head" in n for n, m in ar_model.named_modules())
    assert any(isinstance(m, QuantLinear) for m in ar_model.modules())
    with torch.no_grad():
        e_ar = (ar_model(test).logits - ref).pow(2).mean()
        e_rtn = (rtn_model(test).logits - ref).pow(2).mean()
    assert e_ar < e_rtn, (float(e_ar), float(e_rtn))


@pytest.mark.parametrize("scheme", ["W4G128", "W2G128"])
def test_one_process_steps_equal_the_all_at_once_update(scheme, monkeypatch):
    """The one-process path (each parameter steps in the backward, as its gradient completes) and the path of
    several ranks (every gradient first, summed, then the same steps), run here as a world of one that calls
    itself two: the same codes, scales and losses bit for bit."""
    import wq.algorithms.autoround as ar

    block, inputs, kwargs, targets = _tiny_block()
    plan = {n: QuantScheme.parse(scheme) for n in _linears(block)}
    hooked = autoround_block(block, plan, inputs, kwargs, targets, iters=12, batch_size=2)
    monkeypatch.setattr(ar, "rank_world", lambda: (0, 2))  # collectives stay identities (their own check)
    batched = autoround_block(block, plan, inputs, kwargs, targets, iters=12, batch_size=2)
    assert hooked[_linears(block)[0]].stats["best_iter"] > 0
    for n in plan:
        assert torch.equal(hooked[n].packed.qweight, batched[n].packed.qweight), n
        assert torch.equal(hooked[n].packed.scales, batched[n].packed.scales), n
        assert hooked[n].stats == {**batched[n].stats, "seconds": hooked[n].stats["seconds"]}


def test_micro_batches_sum_the_minibatch_gradient(monkeypatch):
    """One sample per forward and backward (as --low-mem does at seqlen 2048) takes the same signed steps as the whole minibatch at
    once, up to the order of addition: at 2 bits the codes agree on nearly every weight and the block loss is
    as low; with one process and with the path of several ranks alike."""
    import wq.algorithms.autoround as ar

    block, inputs, kwargs, targets = _tiny_block()
    plan = {n: QuantScheme.parse("W2G128") for n in _linears(block)}
    whole = autoround_block(block, plan, inputs, kwargs, targets, iters=12, batch_size=4)
    micro = autoround_block(block, plan, inputs, kwargs, targets, iters=12, batch_size=4, micro_tokens=1)
    monkeypatch.setattr(ar, "rank_world", lambda: (0, 2))
    micro_ranks = autoround_block(block, plan, inputs, kwargs, targets, iters=12, batch_size=4, micro_tokens=1)
    for n in plan:
        same = (micro[n].packed.codes() == whole[n].packed.codes()).float().mean()
        assert same > 0.99, (n, float(same))
        assert torch.equal(micro[n].packed.qweight, micro_ranks[n].packed.qweight), n
    first = _linears(block)[0]
    assert whole[first].stats["best_iter"] > 0 and micro[first].stats["best_iter"] > 0
    assert micro[first].stats["loss"] < 1.02 * whole[first].stats["loss"]
    assert micro[first].stats["loss"] < 0.9 * micro[first].stats["rtn_loss"]


def test_results_in_row_chunks_equal_whole_packing(monkeypatch):
    """The packed results, made a few rows at a time, hold the same codes as packing the whole weight, and the
    relative error is that of the dequantized whole weight."""
    import wq.algorithms.autoround as ar
    from wq.packing import PackedWeight

    monkeypatch.setattr(ar, "_RESULT_CHUNK", 64 * 64)
    block, inputs, kwargs, targets = _tiny_block()
    plan = {n: QuantScheme.parse("W3G128") for n in _linears(block)}
    results = autoround_block(block, plan, inputs, kwargs, targets, iters=6, batch_size=2)
    for n, r in results.items():
        w = block.get_submodule(n).weight.detach()
        assert r.packed.out_features == w.shape[0] and w.shape[0] > 64  # several chunks
        whole = PackedWeight.from_codes(r.packed.codes(), r.packed.scales.t().float(), r.packed.zeros.t().float(),
                                        r.packed.scheme)
        assert torch.equal(whole.qweight, r.packed.qweight), n
        ref = float((w - r.packed.dequantize()).norm() / w.norm())
        assert r.error == pytest.approx(ref, rel=1e-5), n


def test_gradients_summed_but_not_reached_by_the_last_micro_batch_still_step():
    """An MoE expert routed tokens in an earlier micro-batch but none in the last: its summed dL/dV and range
    gradients are stepped after the backward (as the path of several ranks does), not carried into the next
    iteration."""
    from wq.algorithms.autoround import _SignedSteps, _Target
    from wq.algorithms.fake_quant import quantized_forwards

    lin = nn.Linear(128, 64, bias=False)
    t = _Target.make("expert", lin, QuantScheme.parse("W4G128"), True, 1 / 8, 8)
    stepper = _SignedSteps([t], 0.5)
    try:
        stepper.arm(2, 0.1)
        stepper.last = False  # an earlier micro-batch: gradients only summed
        with quantized_forwards({lin: t.forward}):
            lin(torch.randn(5, 128)).pow(2).sum().backward()
        summed, alpha_g = t.v.grad.clone(), t.alpha.grad.clone()
        k0, a0 = t.v.k.clone(), t.alpha.detach().clone()
        stepper.last = True  # the last micro-batch never calls the expert
        stepper.finish()
    finally:
        stepper.remove()
    assert t.v.grad is None and t.alpha.grad is None and t.v.pending == 0
    n = (8 - 2) * t.v.m
    assert torch.equal(t.v.k, (k0 - summed.sign().to(k0.dtype) * n).clamp(-t.v.kmax, t.v.kmax))
    assert not torch.equal(t.v.k, k0)
    assert torch.allclose(t.alpha.detach(), (a0 - 0.1 * alpha_g.sign()).clamp(0.5, 1.0))


def test_low_mem_trains_2048_tokens_at_a_time():
    from wq.algorithms.autoround import LOW_MEM_MICRO_TOKENS, AutoRound

    assert AutoRound(low_mem=True).micro_tokens() == LOW_MEM_MICRO_TOKENS == 2048
    assert AutoRound().micro_tokens() == 0
    assert AutoRound(low_mem=True, micro_tokens=512).micro_tokens() == 512
