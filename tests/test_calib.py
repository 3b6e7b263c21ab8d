"""wq.calib: calibration data sources and the block-by-block pipeline on a tiny Llama built here."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import wq
from wq.algorithms import ALGORITHMS, Algorithm
from wq.algorithms.gptq import GPTQ
from wq.algorithms.rtn import rtn_quantize
from wq.calib import block_output, calibration_samples, calibration_texts
from wq.nn import QuantLinear

# ------------------------------------------------------------------------------------------ tiny model


def tiny_llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def calib_ids():
    return torch.randint(0, 256, (12, 32), generator=torch.Generator().manual_seed(1))  # [n, L]


def _logit_mse(model, ref_model, ids) -> float:
    with torch.no_grad():
        return float(((model(ids).logits - ref_model(ids).logits) ** 2).mean())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


ARGS = {"nsamples": 12, "seqlen": 32, "batch_size": 4}


def test_gptq_pipeline_end_to_end():
    ref = tiny_llama()
    m_gptq, m_rtn = copy.deepcopy(ref), copy.deepcopy(ref)
    ids = torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(1))  # [n, L]
    rep = wq.quantize_model(m_gptq, "W3G32", algo="gptq", calib=ids, progress=False, nsamples=32, seqlen=32,
                            batch_size=8)
    wq.quantize_model(m_rtn, "W3G32", algo="rtn", progress=False)
    names = [n for n, mod in m_gptq.named_modules() if isinstance(mod, QuantLinear)]
    assert len(names) == 14 and "lm_head" not in names  # 7 Linears x 2 blocks; lm_head skipped
    assert set(rep.layers) == set(names)
    assert all(r.stats["loss"] > 0 and r.bytes_after < r.bytes_before for r in rep.layers.values())
    assert rep.peak_memory_bytes > 0 and rep.seconds > 0
    assert all(p.dtype == torch.float32 for p in m_gptq.parameters())  # model dtype kept
    held_out = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(7))
    assert _logit_mse(m_gptq, ref, held_out) < _logit_mse(m_rtn, ref, held_out)


def test_bf16_model_keeps_dtype_and_fp16_scales(calib_ids):
    m = tiny_llama().to(torch.bfloat16)
    wq.quantize_model(m, "W4G32", algo="gptq", calib=calib_ids, progress=False, **ARGS)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    q = m.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.scales.dtype == torch.float16
    with torch.no_grad():
        assert torch.isfinite(m(calib_ids[:1]).logits).all()


def test_act_order_save_load_round_trip(calib_ids, tmp_path):
    m = tiny_llama()
    wq.quantize_model(m, "W4G32", algo="gptq", calib=calib_ids, progress=False, act_order=True, **ARGS)
    assert m.model.layers[0].self_attn.q_proj.g_idx is None  # static groups: plain i // G
    out = wq.save(m, tmp_path / "q", format="wq")
    loaded = wq.load(out[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib_ids[:2]).logits.float(), m(calib_ids[:2]).logits, rtol=1e-4,
                                   atol=1e-4)


class _Interrupt(Exception):
    pass


def test_resume_gives_identical_checkpoint(calib_ids, tmp_path, monkeypatch):
    base = tiny_llama(layers=3)
    full = copy.deepcopy(base)
    wq.quantize_model(full, "W4G32", algo="gptq", calib=calib_ids, progress=False, output=str(tmp_path / "a"),
                      **ARGS)

    calls = {"n": 0}
    original = GPTQ.quantize_weight

    def flaky(self, w, scheme, **kw):
        calls["n"] += 1
        if calls["n"] == 10:  # third Linear of block 1: block 0 is finished and checkpointed
            raise _Interrupt
        return original(self, w, scheme, **kw)

    monkeypatch.setattr(GPTQ, "quantize_weight", flaky)
    out_b = str(tmp_path / "b")
    with pytest.raises(_Interrupt):
        wq.quantize_model(copy.deepcopy(base), "W4G32", algo="gptq", calib=calib_ids, progress=False,
                          output=out_b, **ARGS)
    state = json.loads((tmp_path / "b.partial" / "state.json").read_text())
    assert state["next_block"] == 1 and not state["done"]

    calls["n"] = 100  # no more interrupts
    resumed = copy.deepcopy(base)
    rep = wq.quantize_model(resumed, "W4G32", algo="gptq", calib=calib_ids, progress=False, output=out_b,
                            resume=True, **ARGS)
    assert calls["n"] == 100 + 14  # blocks 1 and 2 only
    assert len(rep.layers) == 21  # block 0's reports come from the checkpoint
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    with pytest.raises(ValueError, match=r"other settings: --damp \(default then, 0.05 now\)"):
        wq.quantize_model(copy.deepcopy(base), "W4G32", algo="gptq", calib=calib_ids, progress=False,
                          output=out_b, resume=True, damp=0.05, **ARGS)
    wq.calib.clear_checkpoint(out_b)
    assert not (tmp_path / "b.partial").exists()


class _BlockRTN(Algorithm):
    """A block-granularity algorithm for the interface test: checks what it is handed, then rounds."""

    name = "test_block_rtn"
    needs_calibration = True
    granularity = "block"
    seen: list = []
    gaps: list = []

    def quantize_block(self, block, plan, inputs, kwargs, targets):
        assert all(isinstance(block.get_submodule(n), nn.Linear) for n in plan)
        assert len(inputs) == len(kwargs) == len(targets) == 3  # 12 samples / batch 4
        gap = 0.0
        for x, kw, y in zip(inputs, kwargs, targets):
            assert x.dtype == torch.float32 and x.shape == (4, 32, 64) and y.shape == x.shape
            with torch.no_grad():  # targets come from the full-precision stream, inputs from the quantized one
                gap = max(gap, float((block_output(block(x, **kw)) - y).abs().max()))
        self.gaps.append(gap)
        self.seen.append(sorted(plan))
        return {n: rtn_quantize(block.get_submodule(n).weight.detach(), s) for n, s in plan.items()}


def test_block_granularity_interface(calib_ids):
    ALGORITHMS.register("test_block_rtn")(_BlockRTN)
    try:
        ref = tiny_llama()
        m, m_rtn = copy.deepcopy(ref), copy.deepcopy(ref)
        wq.quantize_model(m, "W4G32", algo="test_block_rtn", calib=calib_ids, progress=False, low_mem=True, **ARGS)
        wq.quantize_model(m_rtn, "W4G32", algo="rtn", progress=False)
        assert len(_BlockRTN.seen) == 2 and "self_attn.q_proj" in _BlockRTN.seen[0]
        # block 0: both streams start equal; block 1: its inputs carry block 0's quantization error,
        # its targets do not (the unquantized model's hidden states)
        assert _BlockRTN.gaps[0] < 1e-5 and _BlockRTN.gaps[1] > 1e-3
        a, b = _state(m), _state(m_rtn)
        assert all(torch.equal(a[k], b[k]) for k in a)  # same rounding, swapped in by the pipeline
    finally:
        ALGORITHMS._items.pop("test_block_rtn", None)


# ------------------------------------------------------------------------------------------ data


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=True, **kw):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_local_file_and_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha " * 200)
    (tmp_path / "d" / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 30}) for i in range(5)))
    docs = calibration_texts(str(tmp_path / "d"))
    assert len(docs) == 6 and any(d.startswith("alpha") for d in docs)
    one = calibration_texts(str(tmp_path / "d" / "a.txt"))
    assert one == ["alpha " * 200]
    tok = _CharTokenizer()
    s1 = calibration_samples(str(tmp_path / "d"), tok, nsamples=4, seqlen=50, seed=3)
    s2 = calibration_samples(str(tmp_path / "d"), tok, nsamples=4, seqlen=50, seed=3)
    s3 = calibration_samples(str(tmp_path / "d"), tok, nsamples=4, seqlen=50, seed=4)
    assert s1.shape == (4, 50) and torch.equal(s1, s2) and not torch.equal(s1, s3)
    clipped = calibration_samples(str(tmp_path / "d" / "a.txt"), tok, nsamples=2, seqlen=5000, seed=0)
    assert clipped.shape == (2, 1200)  # clipped to the text
    assert calibration_samples(str(tmp_path / "d"), tok, nsamples=2, seqlen=500, max_length=64).shape == (2, 64)


def test_errors_name_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no calibration files"):
        calibration_texts(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_samples("default", None)


def test_default_is_emma():
    docs = calibration_texts(None)
    assert len(docs) == 1 and "Emma Woodhouse" in docs[0][:2000]


def test_cli_resume_after_ctrl_c(tmp_path, monkeypatch):
    """python -m wq.quantize DIR --algo gptq -o OUT: Ctrl-C mid-run, then --resume finishes the same model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from wq.assets import resolve_model
    from wq.quantize import main

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256)
    src = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(src)
    AutoTokenizer.from_pretrained(resolve_model(None)).save_pretrained(src)
    flags = [str(src), "--algo", "gptq", "--scheme", "W4G32", "--nsamples", "4", "--seqlen", "64",
             "--no-progress", "--format", "wq"]
    assert main(flags + ["-o", str(tmp_path / "ref")]) == 0

    original = GPTQ.quantize_weight
    calls = {"n": 0}

    def ctrl_c(self, w, scheme, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # in block 1
            raise KeyboardInterrupt
        return original(self, w, scheme, **kw)

    monkeypatch.setattr(GPTQ, "quantize_weight", ctrl_c)
    out = tmp_path / "out"
    assert main(flags + ["-o", str(out)]) == 130
    assert (tmp_path / "out.partial" / "state.json").exists() and not out.exists()
    assert main(flags + ["-o", str(out), "--resume"]) == 0
    assert calls["n"] == 9 + 7 and not (tmp_path / "out.partial").exists()
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hub_name_goes_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "missing/set":
            raise ConnectionError("offline")
        return datasets.Dataset.from_dict({"text": [f"document {i} " * 20 for i in range(10)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = calibration_texts("NeelNanda/pile-10k", seed=1)
    assert len(docs) == 10 and calls[-1] == ("NeelNanda/pile-10k", None, "train")
    calibration_texts("allenai/c4:en:validation")
    assert calls[-1] == ("allenai/c4", "en", "validation")
    with pytest.raises(ValueError, match="local .txt/.jsonl"):
        calibration_texts("missing/set")


@pytest.mark.kernels  # the automatic CPU dispatch, not the reference the other tests pin
def test_pipeline_recomputes_blocks_with_exact_kernels(monkeypatch, calib_ids):
    """The quantized block's outputs feed the next block: replayed a sample at a time (seqlen 32 rows), where
    the automatic CPU choice is the int8-activation kernel, which the pipeline must pass over; inference
    afterwards gets it back."""
    from wq.kernels import dispatch

    seen = []  # (M, exact_only() inside the call, the chosen kernel is exact)
    forward = QuantLinear.forward

    def spy(self, x):
        seen.append((x.numel() // x.shape[-1], dispatch.exact_only(), dispatch.select(x, self.packed).exact))
        return forward(self, x)

    monkeypatch.setattr(QuantLinear, "forward", spy)
    model = tiny_llama()
    wq.quantize_model(model, "W4G32", algo="gptq", calib=calib_ids, progress=False, **ARGS)
    assert seen and {m for m, _, _ in seen} == {32} and all(inside and exact for _, inside, exact in seen)
    with torch.no_grad():
        model(calib_ids[:1])
    assert seen[-1] == (32, False, False)  # plain inference: cpu_avx2_i8
