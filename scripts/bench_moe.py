"""MoE on CPU: quantization time and peak memory for a random Qwen3-MoE-shaped model with many experts,
and greedy decode tokens/s of the quantized model next to its bf16 and fp32 originals.

    python scripts/bench_moe.py                      # 64 experts x 8 layers, rtn and gptq, decode; docs/moe_bench.{json,md}
    python scripts/bench_moe.py --experts 8 --layers 2 --hidden 128 --out /tmp/moe   # smoke run

Quantization: each run is a fresh process (`--child quantize`) that builds the model from the seed,
quantizes it with wq.quantize_model and reports its wall time and peak RSS (VmHWM), next to the
peak RSS of the same process right after building the model (so the quantization's own share shows).
Decode: one process builds the model, makes bf16 / fp32 copies and the quantized model, and times
greedy generation round-robin (interleaved, median of --rounds), tokens/s of the new tokens only.
The load average at the start and end of every step is recorded: the machine may be shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def build(args) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
                         intermediate_size=args.hidden * 2, moe_intermediate_size=args.moe_inter,
                         num_experts=args.experts, num_experts_per_tok=args.topk, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.02)
    return model.eval().to(torch.bfloat16)


def child_quantize(args) -> dict:
    import wq

    t0 = time.perf_counter()
    model = build(args)
    build_s = time.perf_counter() - t0
    rss_model = vm_hwm()
    params = sum(p.numel() for p in model.parameters())
    extra = {}
    calib = None
    if args.algo != "rtn":
        calib = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(1))
        extra = {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": 4}
    t = time.perf_counter()
    report = wq.quantize_model(model, args.scheme, algo=args.algo, calib=calib, progress=False, **extra)
    seconds = time.perf_counter() - t
    fallbacks = sum("hessian" in r.stats for r in report.layers.values())
    return {"algo": args.algo, "scheme": args.scheme, "params": params, "bf16_bytes": params * 2,
            "build_seconds": round(build_s, 2), "quantize_seconds": round(seconds, 2),
            "peak_rss_after_build": rss_model, "peak_rss": vm_hwm(), "layers": len(report.layers),
            "expert_fallbacks": fallbacks, "blocks_share": report.coverage["blocks_share"]}


@torch.inference_mode()
def decode(args) -> dict:
    import wq

    base = build(args)
    models = {"bf16": base, "fp32": copy.deepcopy(base).float()}
    q = copy.deepcopy(base)
    wq.quantize_model(q, args.scheme, progress=False)
    models[args.scheme] = q
    ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(2))
    kw = {"do_sample": False, "pad_token_id": 0}

    def tps(model) -> float:
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        return (args.new_tokens - 1) / max(time.perf_counter() - t - t1, 1e-9)

    for m in models.values():  # warm-up: kernels prepared, caches allocated
        tps(m)
    runs: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            runs[name].append(tps(m))
    med = {k: statistics.median(v) for k, v in runs.items()}
    dense = max(med["bf16"], med["fp32"])
    return {"tokens_per_s": {k: round(v, 2) for k, v in med.items()}, "runs": runs,
            "speedup_vs_faster_dense": round(med[args.scheme] / dense, 2), "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python scripts/bench_moe.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-inter", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--scheme", default="W4G128")
    p.add_argument("--algos", nargs="+", default=["rtn", "gptq"])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "docs" / "moe_bench"))
    p.add_argument("--child", choices=["quantize"], help=argparse.SUPPRESS)
    p.add_argument("--algo", default="rtn", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child_quantize(args)))
        return {}
    shape = {k: getattr(args, k) for k in ("experts", "topk", "layers", "hidden", "moe_inter", "vocab", "scheme")}
    result = {"shape": shape, "command": "python scripts/bench_moe.py " + " ".join(argv or sys.argv[1:]),
              "torch": torch.__version__, "quantize": [], "decode": None}
    for algo in args.algos:
        la = load_avg()
        cmd = [sys.executable, __file__, "--child", "quantize", "--algo", algo] + [
            a for k, v in shape.items() for a in (f"--{k.replace('_', '-')}", str(v))] + [
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(load_before=la, load_after=load_avg())
        print(json.dumps(row))
        result["quantize"].append(row)
    la = load_avg()
    result["decode"] = {**decode(args), "load_before": la, "load_after": load_avg()}
    print(json.dumps(result["decode"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    s = r["shape"]
    lines = [f"# MoE on CPU: {s['experts']} experts (top-{s['topk']}) x {s['layers']} layers, hidden {s['hidden']}, "
             f"expert width {s['moe_inter']}, vocab {s['vocab']}", "", f"`{r['command']}` (torch {r['torch']})", "",
             "| algorithm | params | bf16 size | quantize s | peak RSS after build | peak RSS | expert fallbacks | "
             "blocks quantized | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for q in r["quantize"]:
        lines.append(f"| {q['algo']} {q['scheme']} | {q['params'] / 1e6:.0f}M | {q['bf16_bytes'] / 2**20:.0f} MiB | "
                     f"{q['quantize_seconds']} | {q['peak_rss_after_build'] / 2**20:.0f} MiB | "
                     f"{q['peak_rss'] / 2**20:.0f} MiB | {q['expert_fallbacks']} | {q['blocks_share']:.1%} | "
                     f"{q['load_before']} -> {q['load_after']} |")
    d = r["decode"]
    lines += ["", f"Greedy decode, batch 1, {d['threads']} threads, median of rounds (load {d['load_before']} -> "
              f"{d['load_after']}):", "", "| model | tokens/s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in d["tokens_per_s"].items()]
    lines += ["", f"quantized / faster dense: {d['speedup_vs_faster_dense']}x", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
