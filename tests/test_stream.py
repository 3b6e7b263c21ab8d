"""Streamed quantization (wq.stream): the model read block by block from its shards equals the model
quantized in memory, bit for bit; FP8 block-scaled sources; resume; the memory estimate; peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zoo
from safetensors.torch import load_file

import wq
from wq.loading.shards import ShardReader, dequantize_fp8_blocks
from wq.loading.skeleton import Skeleton
from wq.stream import quantize_streamed


def _calib():
    return torch.randint(0, zoo.V, (4, 16), generator=torch.Generator().manual_seed(1))


CALIB = {"nsamples": 4, "seqlen": 16, "batch_size": 2}


def _source(arch: str, tmp_path: Path, shard="60KB") -> Path:
    src = tmp_path / f"src-{arch}"
    zoo.build(arch).save_pretrained(src, max_shard_size=shard)
    return src


def _split_blocks(src: Path) -> bool:
    """Some decoder block's tensors live in two different shard files."""
    wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, set] = {}
    for name, f in wm.items():
        parts = name.split(".")
        if "layers" in parts or "h" in parts:
            i = parts.index("layers") if "layers" in parts else parts.index("h")
            files.setdefault(parts[i + 1], set()).add(f)
    return any(len(v) > 1 for v in files.values())


@pytest.mark.parametrize("arch,algo", [("llama", "rtn"), ("llama", "gptq"), ("mixtral", "rtn"), ("mixtral", "gptq"),
                                       ("gpt_oss", "rtn"), ("gpt2", "rtn"), ("llama", "autoround"),
                                       ("llama", "awq"), ("llama", "recon")])
def test_streamed_equals_in_memory(arch, algo, tmp_path):
    """awq (scales folded into the block's norms and Linears) and recon change only their own block, so they
    stream too: the staged block carries the folded norms."""
    src = _source(arch, tmp_path)
    assert _split_blocks(src)  # the point: a block spread over files
    kw = {} if algo == "rtn" else {"calib": _calib(), **CALIB, **({"iters": 2} if algo in ("autoround", "recon")
                                                                    else {})}
    quantize_streamed(src, "W4G128", tmp_path / "streamed", algo=algo, formats=["gptq"], progress=False, **kw)
    model = type(zoo.build(arch)).from_pretrained(src).eval()
    wq.quantize_model(model, "W4G128", algo=algo, progress=False, **kw)
    wq.save(model, tmp_path / "memory", format="gptq")
    a, b = zoo.checkpoint_tensors(tmp_path / "streamed"), zoo.checkpoint_tensors(tmp_path / "memory")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert not (tmp_path / "streamed.partial").exists()  # staging removed once written


def test_streamed_checkpoint_reloads_and_lm_head_override(tmp_path):
    src = _source("llama", tmp_path)
    out = tmp_path / "o"
    res = quantize_streamed(src, "W4G128", out, override=["lm_head=W8G128"], formats=["wq", "compressed-tensors"],
                            progress=False)
    assert [d.name for d in res["dirs"]] == ["wq", "compressed-tensors"]
    model = zoo.build("llama")
    wq.quantize_model(model, "W4G128", override=["lm_head=W8G128"], progress=False)
    ids = torch.randint(0, zoo.V, (1, 12))
    for d in res["dirs"]:
        back = wq.load(d)
        assert isinstance(back.lm_head, wq.nn.QuantLinear)
        with torch.no_grad():
            assert torch.equal(back(ids).logits, model(ids).logits)
    meta = json.loads((out / "wq" / "wq.json").read_text())
    assert meta["coverage"]["blocks_share"] == 1.0 and meta["size_bytes"]["after"] < meta["size_bytes"]["before"]


@pytest.mark.parametrize("algo", ["rtn", "gptq"])
def test_outside_tensors_are_not_held_while_the_blocks_run(algo, tmp_path, monkeypatch):
    """Embeddings and head are read for capturing the first block's inputs and again at the end (an
    overridden lm_head is quantized then), not held in between: the checkpoint is the in-memory one."""
    src = _source("llama", tmp_path)
    seen = []
    load_block = Skeleton.load_block

    def spy(self, i, *a, **k):
        seen.append((self.model.get_input_embeddings().weight.device.type,
                     self.model.get_output_embeddings().weight.device.type))
        return load_block(self, i, *a, **k)

    monkeypatch.setattr(Skeleton, "load_block", spy)
    kw = {} if algo == "rtn" else {"calib": _calib(), **CALIB}
    quantize_streamed(src, "W4G128", tmp_path / "streamed", algo=algo, override=["lm_head=W8G128"], formats=["gptq"],
                      progress=False, **kw)
    assert len(seen) == 2 and set(seen) == {("meta", "meta")}, seen
    model = type(zoo.build("llama")).from_pretrained(src).eval()
    wq.quantize_model(model, "W4G128", algo=algo, override=["lm_head=W8G128"], progress=False, **kw)
    wq.save(model, tmp_path / "memory", format="gptq")
    a, b = zoo.checkpoint_tensors(tmp_path / "streamed"), zoo.checkpoint_tensors(tmp_path / "memory")
    assert "lm_head.qweight" in a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_fp8_block_scaled_source_is_dequantized_on_read(tmp_path):
    src = _source("llama", tmp_path, shard="10MB")
    sd = load_file(str(src / "model.safetensors"))
    fp8 = {}
    for k, t in sd.items():
        if t.dim() == 2 and ".layers." in k:  # DeepSeek-V3 style: e4m3 weights, one scale per 16x16 block
            t = t.float()
            s = t.abs().reshape(t.shape[0] // 16, 16, t.shape[1] // 16, 16).amax((1, 3)) / 448.0  # [o/16, i/16]
            q = (t / s.repeat_interleave(16, 0).repeat_interleave(16, 1)).to(torch.float8_e4m3fn)
            fp8[k], fp8[k + "_scale_inv"] = q, s
        else:
            fp8[k] = t
    from safetensors.torch import save_file

    save_file(fp8, str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16], "fmt": "e4m3"}
    (src / "config.json").write_text(json.dumps(cfg))
    reader = ShardReader(src)
    name = "model.layers.0.mlp.down_proj.weight"
    assert name + "_scale_inv" not in reader.names() and reader.get(name).dtype == torch.bfloat16
    torch.testing.assert_close(reader.get(name), dequantize_fp8_blocks(fp8[name], fp8[name + "_scale_inv"], [16, 16]))
    res = quantize_streamed(src, "W4G128", tmp_path / "o", formats=["wq"], progress=False)
    back = wq.load(res["dirs"][0])
    assert "quant_method" in json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["quant_method"] == "wq"
    assert sum(isinstance(m, wq.nn.QuantLinear) for m in back.modules()) == 14
    # model-free: an FP8 weight that is kept (skipped) is written dequantized, not copied as stored
    from wq.model_free import quantize_model_free

    quantize_model_free(src, "W4G128", tmp_path / "mf", skip=["lm_head", "o_proj"], progress=False)
    kept = zoo.checkpoint_tensors(tmp_path / "mf")
    o = "model.layers.0.self_attn.o_proj.weight"
    assert kept[o].dtype == torch.bfloat16 and o + "_scale_inv" not in kept
    torch.testing.assert_close(kept[o], dequantize_fp8_blocks(fp8[o], fp8[o + "_scale_inv"], [16, 16]))


def test_interrupted_streamed_run_resumes_to_the_same_checkpoint(tmp_path, monkeypatch):
    src = _source("llama", tmp_path)
    full = quantize_streamed(src, "W4G128", tmp_path / "full", algo="gptq", calib=_calib(), formats=["wq"],
                             progress=False, **CALIB)["dirs"][0]
    import wq.calib.pipeline as pipeline

    real = pipeline.Checkpoint.save
    calls = {"n": 0}

    def crash_after_first(self, *a, **k):
        real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Checkpoint, "save", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        quantize_streamed(src, "W4G128", tmp_path / "r", algo="gptq", calib=_calib(), formats=["wq"], progress=False,
                          **CALIB)
    assert not (tmp_path / "r").exists() and (tmp_path / "r.partial" / "block_0000.safetensors").exists()
    monkeypatch.setattr(pipeline.Checkpoint, "save", real)
    quantize_streamed(src, "W4G128", tmp_path / "r", algo="gptq", calib=_calib(), formats=["wq"], progress=False,
                      resume=True, **CALIB)
    a, b = zoo.checkpoint_tensors(full), zoo.checkpoint_tensors(tmp_path / "r")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_skeleton_holds_no_weights_until_a_block_loads(tmp_path):
    src = _source("mixtral", tmp_path)
    sk = Skeleton(ShardReader(src))
    assert all(p.device.type == "meta" for p in sk.model.parameters())
    block = sk.load_block(1)
    assert all(p.device.type == "cpu" for p in block.parameters())
    assert isinstance(block.mlp.experts, wq.nn.QuantExperts)  # per-expert checkpoint names -> per-expert modules
    sk.release_block(1)
    assert all(p.device.type == "meta" for p in block.parameters())


def test_cli_refuses_a_run_that_does_not_fit_before_loading(tmp_path, monkeypatch, capsys):
    from wq.quantize import main

    src = _source("llama", tmp_path)
    monkeypatch.setenv("WQ_MEMORY_AVAILABLE", "1e6")  # 1 MB
    assert main([str(src), "--scheme", "W4G128", "--algo", "gptq", "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and "try" in err and not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def _bench_rows(tmp_path, layers: int, hidden: int, algo: str, paths: list[str]) -> list[dict]:
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_stream.py"
    out = subprocess.run([sys.executable, str(script), "--layers", str(layers), "--hidden", str(hidden), "--algos", algo,
                          "--paths", *paths, "--out", str(tmp_path / f"b{layers}{algo}"), "--work",
                          str(tmp_path / "w")], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_rtn_peak_memory_is_within_the_budget_and_flat(tmp_path):
    """A model whose size dominates the interpreter (hidden 2048: 4 blocks are 0.6 GB, 12 are 1.3 GB): model-free
    and streamed rtn stay under the issue's budget (3 decoder blocks in bf16 over the process's baseline) at both
    sizes, and do not grow with the number of blocks."""
    peaks, block = {}, 0
    for layers in (4, 12):
        for row in _bench_rows(tmp_path, layers, 2048, "rtn", ["model-free", "streamed"]):
            assert row["over_baseline"] <= row["budget"], row
            peaks[layers, row["path"]], block = row["over_baseline"], row["block_bytes"]
    for path in ("model-free", "streamed"):  # 8 more blocks add less than one block's size (glibc's heap varies)
        assert peaks[12, path] < peaks[4, path] + block, (peaks, block)


@pytest.mark.slow
def test_gptq_peak_memory_is_flat_in_the_number_of_blocks(tmp_path):
    """Streamed gptq holds one block, its Hessians and the calibration stream: its peak over the baseline does not
    grow with the model. (Whether it is within the 3-block budget is measured at hidden 2048, where the block
    dominates the interpreter's noise: docs/streaming.md.)"""
    peaks, block = {}, 0
    for layers in (4, 12):
        (row,) = _bench_rows(tmp_path, layers, 1024, "gptq", ["streamed"])
        peaks[layers], block = row["over_baseline"], row["block_bytes"]
    # A block here is 22 MiB and glibc's heap varies by tens of MiB run to run (measured: 176 -> 255 MiB at 4 -> 12
    # blocks; 770 -> 792 MiB at 8 -> 32 blocks of hidden 2048, docs/streaming.md): 8 more blocks may add less
    # than half a block each, so a run that kept every block (8 x 22 MiB more) fails
    assert peaks[12] < peaks[4] + 4 * block, (peaks, block)


def test_a_released_quantized_block_keeps_no_tensor():
    """After a block's outputs are recomputed through its QuantLinears (which bind kernel plans to their
    tensors), moving it to the meta device frees those tensors: a streamed run must not keep every
    finished block alive through its plans."""
    import gc
    import weakref

    from wq.algorithms.rtn import rtn_quantize
    from wq.kernels.dispatch import exact_kernels

    lin = wq.nn.QuantLinear.from_packed(rtn_quantize(torch.randn(64, 256), wq.QuantScheme.parse("W4G128")).packed)
    with torch.no_grad(), exact_kernels():
        lin(torch.randn(2, 40, 256))  # plans for this call shape
    assert lin.__dict__.get("_plans")
    ref = weakref.ref(lin.qweight)
    lin.to("meta")
    gc.collect()
    assert ref() is None and lin.qweight.device.type == "meta"


def test_memory_estimate_counts_the_block_as_calibration_holds_it(tmp_path):
    """gptq and autoround keep a bf16 block's Linear weights as stored (wq.calib.upcast); other block algorithms
    train on an fp32 block: the estimate's block term differs by the block's fp32 - bf16 size, and data-free runs
    hold it as stored. Block algorithms add their own state per weight."""
    from wq.plan.memory import estimate_streamed
    from wq.scheme import QuantScheme

    src = tmp_path / "bf16"
    zoo.build("llama").to(torch.bfloat16).save_pretrained(src)
    sk = Skeleton(ShardReader.open(src))
    assert sk.dtype == torch.bfloat16
    plan = {n: QuantScheme.parse("W4G32") for n, m in sk.model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}
    kw = {"nsamples": 4, "seqlen": 16}
    rtn = estimate_streamed(sk, plan, calibrated=False).terms["block"]
    gptq = estimate_streamed(sk, plan, calibrated=True, **kw).terms["block"]
    fp32 = estimate_streamed(sk, plan, calibrated=True, block_algo=True, **kw).terms["block"]
    stored = sum(p.numel() * 2 for p in sk.blocks[0].parameters())
    assert gptq == rtn and fp32 - gptq == stored  # fp32 is twice bf16: one more stored size
    # autoround reads the bf16 weights as stored and adds its own state, counted per planned weight of a block
    from wq.algorithms.autoround import AutoRound

    est = estimate_streamed(sk, plan, calibrated=True, block_algo=True, reads_16bit=AutoRound.reads_16bit_weights,
                            state_per_weight=AutoRound.state_bytes_per_weight, **kw).terms
    weights = sum(m.weight.numel() for n, m in sk.blocks[0].named_modules() if isinstance(m, torch.nn.Linear))
    assert est["block"] == gptq and est["algorithm state"] == int(3.0 * weights)
    # activations: one sample's widest intermediates for a layer algorithm (replayed a sample at a time), a
    # training batch's for a block algorithm
    widest = max(m.out_features for m in sk.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    assert estimate_streamed(sk, plan, calibrated=True, **kw).terms["activations"] == 16 * widest * 4 * 3
    assert estimate_streamed(sk, plan, calibrated=True, block_algo=True, batch_size=2, **kw).terms["activations"] == 2 * 16 * widest * 4 * 3
    assert "activations" not in estimate_streamed(sk, plan, calibrated=False).terms
    # a block algorithm that trains holds them through a backward: seven of the widest through autograd, four where
    # autoround fuses a gated MLP (three under --low-mem, which recomputes)
    assert est["activations"] == 16 * widest * 4 * 7
    from wq.plan.memory import backward_intermediates

    fused = estimate_streamed(sk, plan, calibrated=True, block_algo=True, state_per_weight=3.0,
                              backward_widest=backward_intermediates(AutoRound, low_mem=False), **kw).terms
    assert fused["activations"] == 16 * widest * 4 * 4
    assert backward_intermediates(AutoRound, low_mem=True) == 3
    from wq.algorithms.recon import Recon

    assert backward_intermediates(Recon, low_mem=True) == 7


def test_training_footprint_under_low_mem():
    """autoround's declared state and samples per forward: 3 bytes a weight and the whole batch by default, 7 with
    several ranks; under --low-mem 7 bytes and at most 2048 tokens of whole samples. gptq declares no such mode."""
    from wq.algorithms.autoround import AutoRound
    from wq.algorithms.gptq import GPTQ
    from wq.plan.memory import training_footprint

    kw = {"ranks": 1, "batch_size": 8, "seqlen": 2048}
    assert training_footprint(AutoRound, low_mem=False, **kw) == (3.0, 8)
    assert training_footprint(AutoRound, low_mem=False, **{**kw, "ranks": 2}) == (7.0, 8)
    assert training_footprint(AutoRound, low_mem=True, **kw) == (7.0, 1)
    assert training_footprint(AutoRound, low_mem=True, **{**kw, "seqlen": 512}) == (7.0, 4)
    assert training_footprint(AutoRound, low_mem=True, **{**kw, "seqlen": 128}) == (7.0, 8)  # the batch is the cap
    assert training_footprint(GPTQ, low_mem=True, **kw) == (0.0, 8)
