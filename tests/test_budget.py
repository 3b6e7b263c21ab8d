"""--bits-budget: the written checkpoint meets the budget exactly by its own bit count; the allocation is
the knapsack optimum; each format records the per-layer schemes."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

import wq
from wq.budget import allocate, layer_bits
from wq.scheme import QuantScheme


def _checkpoint_bits(path, layers) -> int:
    """Bits of every tensor of the quantized layers except biases, read from the written file."""
    state = load_file(str(path / "model.safetensors"))
    return sum(t.numel() * t.element_size() * 8 for k, t in state.items()
               if k.rsplit(".", 1)[0] in layers and not k.endswith(".bias"))


@pytest.mark.parametrize("fmt,budget", [("compressed-tensors", 3.3), ("gptq", 2.9), ("wq", 4.2)])
def test_written_checkpoint_meets_the_budget_exactly(fmt, budget, tmp_path):
    model = make_tiny_llama(hidden=128, inter=256).float()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    wq.quantize_model(model, "W4G128", algo="rtn", bits_budget=budget, budget_format=fmt, calib=calib, nsamples=4,
                      seqlen=32, progress=False)
    alloc = model.wq_quant["bits_budget"]
    layers = model.wq_quant["layers"]
    assert len({s for s in layers.values()}) > 1, layers  # really mixed
    wq.save(model, tmp_path / "q")  # the budget's format is the default
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "compressed-tensors" if fmt == "compressed-tensors" else fmt)
    bits = _checkpoint_bits(tmp_path / "q", layers)
    numel = sum(model.get_submodule(n).out_features * model.get_submodule(n).in_features for n in layers)
    assert bits == sum(v["bits"] for v in alloc["layers"].values())  # the search counted what was written
    assert bits / numel == pytest.approx(alloc["bits"], abs=0, rel=1e-12)
    assert bits / numel <= budget
    assert budget - bits / numel < 0.15  # and used most of it (the cheapest upgrade here is ~0.1 bits/weight)
    meta = json.loads((tmp_path / "q" / "wq.json").read_text())
    assert meta["bits_budget"]["budget"] == budget and meta["layers"] == layers
    back = wq.load(tmp_path / "q")
    assert {n: str(m.packed.scheme) for n, m in back.named_modules() if hasattr(m, "packed")} == layers


def test_format_configs_name_each_layer(tmp_path):
    model = make_tiny_llama(hidden=128, inter=256).float()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    wq.quantize_model(model, "W4G128", algo="rtn", bits_budget=3.9, calib=calib, nsamples=4, seqlen=32,
                      progress=False, bits_candidates=["W3G64-sym", "W4G64", "W8G128"], budget_format="gptq")
    layers = model.wq_quant["layers"]
    main = model.wq_quant["scheme"]
    wq.save(model, tmp_path / "gptq", format="gptq")
    wq.save(model, tmp_path / "ct", format="compressed-tensors")
    dyn = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["dynamic"]
    assert {k[2:].replace("\\.", ".").rstrip("$") for k in dyn} == {n for n, s in layers.items() if s != main}
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(t for g in groups.values() for t in g["targets"]) == sorted(layers)


def test_allocation_is_the_knapsack_optimum():
    gen = torch.Generator().manual_seed(0)
    names = [f"l{i}" for i in range(5)]
    schemes = ["a", "b", "c"]
    numel = {n: 100 for n in names}
    bits = {n: {"a": 200, "b": 300, "c": 400} for n in names}
    costs = {n: dict(zip(schemes, sorted((torch.rand(3, generator=gen) * 10).tolist(), reverse=True))) for n in names}
    for budget in (2.0, 2.4, 3.0, 3.6, 4.0):
        got = allocate(costs, bits, numel, budget)
        best = min((c for c in itertools.product(schemes, repeat=5)
                    if sum(bits[n][s] for n, s in zip(names, c)) <= budget * 500),
                   key=lambda c: sum(costs[n][s] for n, s in zip(names, c)))
        assert sum(costs[n][got[n]] for n in names) == pytest.approx(sum(costs[n][s] for n, s in zip(names, best)))
    with pytest.raises(ValueError, match="below the smallest"):
        allocate(costs, bits, numel, 1.9)


def test_layer_bits_counts_the_format_tensors():
    s = QuantScheme.parse("W4G128")  # symmetric: compressed-tensors stores no zero point
    ct = layer_bits(s, 576, 1536, "compressed-tensors")
    assert ct == 576 * 1536 * 4 + 576 * 12 * 16 + 2 * 64
    gp = layer_bits(s, 576, 1536, "gptq")  # + qzeros and g_idx
    assert gp == ct - 2 * 64 + 12 * (576 * 4) + 1536 * 32


def test_cli_writes_and_prints_the_allocation(tmp_path, real_tokenizer, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from wq.quantize import main

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(real_tokenizer), max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    real_tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "q"
    assert main([str(tmp_path / "m"), "--bits-budget", "3.3", "--nsamples", "2", "--seqlen", "64", "-o", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mixed precision, budget 3.3 bits/weight" in printed
    meta = json.loads((out / "wq.json").read_text())
    assert meta["bits_budget"]["bits"] <= 3.3 and meta["bits_budget"]["fisher_samples"] == 2
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
