"""QuantExperts: unfusing every fused layout exactly, per-expert Hessians from routed tokens, the
few-tokens fallback, Hessian passes under a memory budget, Hub names, HF loading, coverage."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import zoo
from safetensors import safe_open

import wq
from wq.algorithms.base import Algorithm, QuantResult
from wq.algorithms.rtn import rtn_quantize
from wq.calib.pipeline import _quantize_layers
from wq.nn import QuantExperts, QuantLinear, materialize, plan_layers
from wq.nn.coverage import coverage
from wq.nn.experts import find_fused_experts, unfuse


def _ids(n=2, t=16, seed=2):
    return torch.randint(0, zoo.V, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", zoo.MOE)
def test_unfuse_matches_the_fused_module(arch):
    model = zoo.build(arch)
    with torch.no_grad():
        ref = model(_ids()).logits
    fused = find_fused_experts(model)
    assert fused
    for name, mod in fused.items():
        q = unfuse(mod)
        assert len(q.experts()) == mod.down_proj.shape[0]
        model.set_submodule(name, q)
    with torch.no_grad():
        out = model(_ids()).logits
    # Equal up to fp32 summation order: transformers' fused paths (grouped_mm by default since 5.2x, and its
    # eager loop's concatenated gate_up matmul) round differently from per-expert linears by ~2e-7, while a
    # wrong expert, row order or gate/up split moves the logits by ~1e-1.
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_expert_rows_are_the_fused_rows():
    model = zoo.build("gpt_oss")  # transposed, interleaved gate/up, biases
    mod = model.model.layers[0].mlp.experts
    q = unfuse(mod)
    e = 3
    gate_up = mod.gate_up_proj[e].t()  # [2I, H]
    assert torch.equal(q[e].gate_proj.weight, gate_up[0::2]) and torch.equal(q[e].up_proj.weight, gate_up[1::2])
    assert torch.equal(q[e].up_proj.bias, mod.gate_up_proj_bias[e, 1::2])
    assert torch.equal(q[e].down_proj.weight, mod.down_proj[e].t())


def test_routers_stay_and_patterns_reach_experts():
    model = zoo.build("qwen2_moe")
    plan, skipped = plan_layers(model, "W4G128", override=["experts=W3G128"])
    assert "model.layers.0.mlp.shared_expert_gate" in skipped
    assert str(plan["model.layers.1.mlp.experts.3.down_proj"]) == "W3G128"
    assert str(plan["model.layers.1.mlp.shared_expert.up_proj"]) == "W4G128"
    assert sum(".experts." in n for n in plan) == 2 * 4 * 3
    plan, skipped = plan_layers(model, "W4G128", skip=[r"experts\.[02]\."])
    assert "model.layers.0.mlp.experts.2.gate_proj" in skipped and "model.layers.0.mlp.experts.1.gate_proj" in plan


class _Spy(Algorithm):
    """Records the Hessian each Linear gets; quantizes with rtn."""

    name = "spy"
    needs_calibration = True

    def __init__(self, **settings):
        super().__init__(**settings)
        self.H = {}

    def quantize_weight(self, w, scheme, *, H):
        res = rtn_quantize(w, scheme)
        return QuantResult(res.packed, res.error, {})


def _moe_block(arch="mixtral"):
    model = zoo.build(arch)
    plan, _ = plan_layers(model, "W4G128")
    materialize(model, plan)
    block = model.model.layers[1]
    names = {n.split("layers.1.", 1)[1]: s for n, s in plan.items() if ".layers.1." in n}
    return model, block, names


def _block_inputs(model, n=4, t=16):
    captured = []
    h = model.model.layers[1].register_forward_pre_hook(lambda m, a, kw: captured.append((a, kw)), with_kwargs=True)
    with torch.no_grad():
        model(_ids(n, t))
    h.remove()
    (args, kw), = captured
    x = args[0] if args else kw.pop("hidden_states")
    kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")}
    return [x], [kw]


def test_expert_hessians_see_only_routed_tokens():
    model, block, names = _moe_block()
    hidden, kwargs = _block_inputs(model)
    results, _ = _quantize_layers(block, names, _Spy(), hidden, kwargs, torch.device("cpu"), min_tokens=0)
    tokens = {rel: results[rel].stats["tokens"] for rel in names if ".experts." in rel and rel.endswith("gate_proj")}
    n_tok, k = hidden[0].shape[0] * hidden[0].shape[1], model.config.num_experts_per_tok
    assert sum(tokens.values()) == n_tok * k  # every token reaches exactly k experts
    assert len(set(tokens.values())) > 1  # and the router does not send every expert the same ones
    for rel in names:
        if rel.endswith("up_proj") and ".experts." in rel:  # gate and up of one expert share their input
            assert results[rel].stats["tokens"] == results[rel.replace("up_proj", "gate_proj")].stats["tokens"]


def test_rare_experts_fall_back_to_every_token():
    model, block, names = _moe_block()
    hidden, kwargs = _block_inputs(model)
    seen = {}

    class Rec(_Spy):
        def quantize_weight(self, w, scheme, *, H):
            seen[w.data_ptr()] = H  # the block is fp32: w is the Linear's own weight
            return super().quantize_weight(w, scheme, H=H)

    experts = block.mlp.experts
    ref = copy.deepcopy(experts)  # the pipeline frees each quantized Linear's weight as it goes
    ptr = {experts[2].down_proj.weight.data_ptr(): "down", experts[2].gate_proj.weight.data_ptr(): "gate"}
    moe_in = []
    hook = experts.register_forward_pre_hook(lambda m, a: moe_in.append(a[0]))
    results, _ = _quantize_layers(block, names, Rec(), hidden, kwargs, torch.device("cpu"), min_tokens=10**6)
    hook.remove()
    n_tok = hidden[0].shape[0] * hidden[0].shape[1]
    rels = [rel for rel in names if ".experts." in rel]
    assert rels and all(f"all {n_tok} tokens" in results[rel].stats["hessian"] for rel in rels)
    assert all(block.get_submodule(rel).weight.is_meta for rel in names)  # freed once quantized
    x = moe_in[0]  # [tokens, hidden]: what the experts module got
    with torch.no_grad():
        h = ref.down_input(2, x)  # expert 2's activation of every token
    want_down = (h.t() @ h) * (2.0 / h.shape[0])
    want_up = (x.t() @ x) * (2.0 / x.shape[0])
    got = {ptr[p]: H for p, H in seen.items() if p in ptr}
    torch.testing.assert_close(got["down"], want_down, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["gate"], want_up, rtol=1e-4, atol=1e-6)


def test_hessian_budget_splits_passes_without_changing_results():
    model, block, names = _moe_block()
    hidden, kwargs = _block_inputs(model)

    class Gptq(_Spy):
        def quantize_weight(self, w, scheme, *, H):
            from wq.algorithms.gptq import gptq_quantize

            return gptq_quantize(w, H, scheme)

    twin = copy.deepcopy(block)  # each run frees the weights it has quantized
    one, _ = _quantize_layers(block, names, Gptq(), hidden, kwargs, torch.device("cpu"), min_tokens=0)
    many, _ = _quantize_layers(twin, names, Gptq(), hidden, kwargs, torch.device("cpu"), min_tokens=0, budget=1)
    for rel in names:
        assert torch.equal(one[rel].packed.qweight, many[rel].packed.qweight), rel


def test_checkpoint_uses_the_hub_checkpoint_names(tmp_path):
    model = zoo.build("mixtral")
    model.save_pretrained(tmp_path / "hf")  # transformers writes the original (per-expert) names
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        hub = {k.rsplit(".", 1)[0] for k in f.keys()}
    wq.quantize_model(model, "W4G128", progress=False)
    wq.save(model, tmp_path / "q", format="gptq")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        ours = {k.rsplit(".", 1)[0] for k in f.keys()}
    assert "model.layers.1.block_sparse_moe.experts.3.w1" in ours  # Mixtral: w1 = gate, w3 = up, w2 = down
    assert ours == hub
    cfg = json.loads((tmp_path / "q" / "wq.json").read_text())
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in cfg["layers"]


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "gpt2"])
def test_transformers_from_pretrained_reads_experts_and_conv1d(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = zoo.build(arch)
    wq.quantize_model(model, "W4G128", progress=False)
    wq.save(model, tmp_path / "q", format="wq")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert any(isinstance(m, QuantLinear) for m in back.modules())
    with torch.no_grad():
        assert torch.equal(back(_ids()).logits, model(_ids()).logits)


def test_coverage_warns_names_and_strict_fails():
    model = zoo.build("mixtral")
    plan, skipped = plan_layers(model, "W4G128", skip=["lm_head", "experts"])
    cov = coverage(model, plan, skipped)
    assert cov.block_share < 0.2 and "experts" in cov.warning()
    assert cov.by_kind["experts"]["quantized"] == 0 and cov.by_kind["experts"]["kept"] == 2 * 4 * 3 * 64 * 96
    with pytest.raises(wq.api.CoverageError, match="experts"):
        wq.quantize_model(model, "W4G128", skip=["lm_head", "experts"], strict=True, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # failed before any work
    report = wq.quantize_model(model, "W4G128", progress=False, strict=True)
    assert report.coverage["blocks_share"] > 0.99


def test_unhandled_experts_layout_is_named():
    from transformers import DbrxConfig, DbrxForCausalLM

    cfg = DbrxConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=zoo.V,
                     attn_config={"kv_n_heads": 2, "rope_theta": 10000.0}, ffn_config={"ffn_hidden_size": 96, "moe_num_experts": 4,
                                                               "moe_top_k": 2})
    model = DbrxForCausalLM(cfg).eval()
    report = wq.quantize_model(model, "W4G128", progress=False)
    kept = report.coverage["kept_in_blocks"]
    assert report.coverage["blocks_share"] < 0.99
    assert any("experts" in n and ("not a Linear" in r or "does not handle" in r) for n, r in kept.items())


def test_experts_run_on_cpu_kernels_like_the_reference(monkeypatch):
    model = zoo.build("qwen3_moe")
    wq.quantize_model(model, "W4G32", progress=False)
    ids = _ids(1, 8)
    monkeypatch.setenv("WQ_KERNEL", "reference")
    with torch.no_grad():
        ref = model(ids).logits
    monkeypatch.delenv("WQ_KERNEL")
    with torch.no_grad(), wq.kernels.dispatch.exact_kernels():
        fast = model(ids).logits
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)


def test_low_bit_experts_are_flagged_for_servers(tmp_path):
    model = zoo.build("qwen3_moe")
    wq.quantize_model(model, "W4G32", override=["experts=W2G32"], progress=False)
    wq.save(model, tmp_path / "q", format="wq")
    who = json.loads((tmp_path / "q" / "wq.json").read_text())["consumers"]
    assert who["wq.load"] is None and "4/8-bit experts" in who["vllm"]


def test_partly_unquantized_experts_reload_everywhere(tmp_path):
    from transformers import AutoModelForCausalLM

    model = zoo.build("mixtral")
    wq.quantize_model(model, "W4G128", override=[r"experts\.0\.=BF16"], progress=False)
    assert isinstance(model.model.layers[0].mlp.experts[0].up_proj, torch.nn.Linear)
    wq.save(model, tmp_path / "q", format="wq")
    with torch.no_grad():
        ref = model(_ids()).logits
        assert torch.equal(wq.load(tmp_path / "q")(_ids()).logits, ref)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(_ids()).logits, ref)
