"""FP16 audit: planted values land in exactly their column; the refusal and --force; plain checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import wq
from wq.fp16_audit import (
    FP16_INF_FROM,
    Fp16OverflowError,
    activation_amax,
    audit_weights,
    cast_stats,
    check_writable,
)

BIG_DOWN = "model.layers.1.mlp.down_proj"


def planted_model(vocab: int = 128) -> LlamaForCausalLM:
    """A tiny Llama whose only FP16 problems are planted:

    - lm_head.weight[5, 0] = 70000 (-> inf), harmless to activations: model.norm.weight[0] = 0
    - layers.0.mlp.gate_proj: 2^-26, 2^-30 and exactly 2^-25 (all -> 0)
    - layers.0.self_attn.o_proj: 1.5 * 2^-25 and 1.75 * 2^-25 (-> 2^-24, subnormal)
    - layers.1 MLP: gate/up weights 0, biases 10, down weights 6: down_proj's output is
      128 * silu(10) * 10 * 6 ~ 76800 > 65520 on every token, and so are the residual after it
      (block 1's output and the final norm's input); nothing else comes near.
    Every other weight is kept away from FP16's subnormal range (|w| >= 1e-3).
    """
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False, mlp_bias=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.where(p == 0, p, p.sign() * p.abs().clamp(min=1e-3)))
        m.lm_head.weight[5, 0] = 70000.0
        m.model.norm.weight[0] = 0.0
        g = m.model.layers[0].mlp.gate_proj.weight
        g[0, 0], g[0, 1], g[0, 2] = 2.0**-26, -(2.0**-30), 2.0**-25
        o = m.model.layers[0].self_attn.o_proj.weight
        o[1, 0], o[1, 1] = 1.5 * 2.0**-25, -1.75 * 2.0**-25
        mlp = m.model.layers[1].mlp
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.zero_()
            lin.bias.fill_(10.0)
        mlp.down_proj.weight.fill_(6.0)
        mlp.down_proj.bias.zero_()
    return m.to(torch.bfloat16)  # every planted value is exact in BF16


def calib(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


def test_cast_stats_boundaries():
    x = torch.tensor([[65504.0, 65519.0, 65520.0, 2.0**-25, 1.01 * 2.0**-25, 2.0**-24, 2.0**-14, 1.0]])
    s = cast_stats(x)
    assert (s.overflow, s.flushed, s.min_subnormal, s.subnormal) == (1, 1, 1, 2)
    assert x.to(torch.float16)[0, 1] == 65504  # below 65520 rounds down, not to inf


def test_planted_weights_each_in_its_column():
    m = planted_model()
    stats = audit_weights(m)
    cols = {c: {n: getattr(s, c) for n, s in stats.items() if getattr(s, c)}
            for c in ("overflow", "flushed", "subnormal", "min_subnormal")}
    assert cols["overflow"] == {"lm_head.weight": 1}
    assert cols["flushed"] == {"model.layers.0.mlp.gate_proj.weight": 3}
    assert cols["subnormal"] == {"model.layers.0.self_attn.o_proj.weight": 2}
    assert cols["min_subnormal"] == {"model.layers.0.self_attn.o_proj.weight": 2}
    # flushed values have relative error 1; values raised to 2^-24 err by (2^-24 - x) / x
    assert stats["model.layers.0.mlp.gate_proj.weight"].rel_err_max == 1.0
    assert stats["model.layers.0.self_attn.o_proj.weight"].rel_err_max == pytest.approx(1 / 3, rel=1e-6)
    assert stats["model.layers.0.self_attn.q_proj.weight"].rel_err_max < 2.0**-11  # normal range: half an ulp


def test_planted_activations_named():
    m = planted_model().float()
    acts = activation_amax(m, calib())
    over = {a.name: a.kind for a in acts if a.overflows}
    assert over == {f"{BIG_DOWN}:out": "linear.out", "model.layers.1:out": "block.out",
                    "model.norm:in": "residual"}
    amax = {a.name: a.amax for a in acts}
    assert amax[f"{BIG_DOWN}:in"] < 200  # silu(10) * 10
    assert len({a.kind for a in acts}) == 4 and all(h.is_floating_point() for h in m.parameters())


def test_refusal_then_force():
    m = planted_model()
    with pytest.raises(Fp16OverflowError) as e:
        wq.cast_model(m, "FP16", calib=calib())
    msg = str(e.value)
    assert "lm_head.weight" in msg and f"{BIG_DOWN}:out" in msg and "--force" in msg and "BF16" in msg
    assert m.dtype == torch.bfloat16  # refused before converting
    audit = wq.cast_model(m, "FP16", calib=calib(), force=True)
    assert not audit.ok and audit.max_activation.amax >= FP16_INF_FROM
    assert m.dtype == torch.float16 and torch.isinf(m.lm_head.weight).sum() == 1


def test_fp16_checkpoint_plain_and_audit_json(tmp_path):
    m = planted_model()
    with torch.no_grad():  # remove the planted overflows: now FP16 is fine
        m.lm_head.weight[5, 0] = 1.0
        m.model.layers[1].mlp.down_proj.weight.fill_(0.01)
    audit = wq.cast_model(m, "FP16", calib=calib())
    assert audit.ok
    x = calib()[:1]
    with torch.no_grad():
        ref = m.float()(x).logits
    m.half()
    out = tmp_path / "fp16"
    wq.save(m, out)
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    meta = json.loads((out / "wq.json").read_text())
    assert meta["scheme"] == "FP16" and meta["report"]["ok"]
    saved = json.loads((out / "fp16_audit.json").read_text())
    assert saved["weights"]["model.layers.0.mlp.gate_proj.weight"]["flushed"] == 3
    assert saved["max_activation"]["name"]
    plain = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no wq
    assert plain.dtype == torch.float16
    with torch.no_grad():
        torch.testing.assert_close(plain.float()(x).logits, ref)
    assert wq.load(out).dtype == torch.float16


def test_check_writable_passes_clean_audit():
    m = planted_model()
    with torch.no_grad():
        m.lm_head.weight[5, 0] = 1.0
    audit = wq.cast.audit_fp16(m)  # weights only
    check_writable(audit)  # no raise: activations were not measured, weights fit


def test_cast_rejects_quant_schemes():
    with pytest.raises(ValueError, match="not a cast"):
        wq.cast_model(planted_model(), "W4G128")
    with pytest.raises(ValueError, match="cast_model"):
        wq.quantize_model(planted_model(), "FP16")


def test_cli_refuses_without_force_and_writes_with_it(tmp_path, real_model_dir, capsys):
    from transformers import AutoTokenizer

    from wq.quantize import main

    src = tmp_path / "planted"
    planted_model(vocab=49152).save_pretrained(src)
    AutoTokenizer.from_pretrained(real_model_dir).save_pretrained(src)
    args = [str(src), "--scheme", "FP16", "--nsamples", "2", "--seqlen", "32", "-o", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lm_head.weight" in err and f"{BIG_DOWN}:out" in err and "--force" in err
    assert not (tmp_path / "out").exists()
    assert main(args + ["--force"]) == 0
    out = capsys.readouterr().out
    assert "NO (inf)" in out and "FP16 NOT OK" in out
    audit = json.loads((tmp_path / "out" / "fp16_audit.json").read_text())
    assert not audit["ok"] and audit["calib"]["shape"] == [2, 32]
