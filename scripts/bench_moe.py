"""MoE on CPU: quantization time and peak memory for a random Qwen3-MoE-shaped model with many experts,
and greedy decode tokens/s of the quantized model next to its bf16 and fp32 originals.

    python scripts/bench_moe.py                      # 64 experts x 8 layers, rtn and gptq, decode; docs/moe_bench.{json,md}
    python scripts/bench_moe.py --experts 8 --layers 2 --hidden 128 --out /tmp/moe   # smoke run

Quantization: the model is saved once (bf16, four safetensors shards, SmolLM2's tokenizer and vocabulary
so gptq calibrates on real text); each run is a fresh process (`--child quantize`) that runs the CLI
(`wq.quantize.main`) on it and reports its wall time and peak RSS (VmHWM), next to a fresh process that
only imports the same modules (the baseline). Paths: rtn model-free (the CLI default for rtn), rtn and
gptq streamed block by block (`--no-model-free`; gptq's default), gptq with the whole model loaded first
(`--no-stream`).
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


def save_model(args, path: Path) -> dict:
    """The random model as a checkpoint a user would have: bf16 shards, tokenizer files."""
    import shutil

    from wq.assets import resolve_model

    if not (path / "config.json").exists():
        model = build(args)
        total = sum(p.numel() * 2 for p in model.parameters())
        model.save_pretrained(path, max_shard_size=f"{total // 4 // 1000 + 1}KB")
        for f in Path(resolve_model(None)).glob("tokenizer*"):
            shutil.copy2(f, path / f.name)
    params = sum(int(torch.tensor(v).prod()) for v in _shapes(path))
    return {"params": params, "bf16_bytes": params * 2}


def _shapes(path: Path):
    from safetensors import safe_open

    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                yield h.get_slice(k).get_shape()


def child_quantize(argv: list[str]) -> dict:
    t = time.perf_counter()
    if argv[0] == "baseline":
        import transformers  # noqa: F401

        import wq.quantize  # noqa: F401
        import wq.stream  # noqa: F401
        rc = 0
    else:
        from wq.quantize import main

        rc = main(argv)
    return {"rc": rc, "seconds": round(time.perf_counter() - t, 2), "peak_rss": vm_hwm()}


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


PATHS = {"rtn model-free": ("rtn", []), "rtn streamed": ("rtn", ["--no-model-free"]),
         "gptq streamed": ("gptq", []), "gptq whole model": ("gptq", ["--no-stream"])}


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child_quantize(sys.argv[2:])))
        return {}
    p = argparse.ArgumentParser(prog="python scripts/bench_moe.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-inter", type=int, default=256)
    p.add_argument("--vocab", type=int, default=49152, help="SmolLM2's: its tokenizer writes the calibration tokens")
    p.add_argument("--scheme", default="W4G128")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default="/tmp/wq-bench-moe")
    p.add_argument("--out", default=str(ROOT / "docs" / "moe_bench"))
    args = p.parse_args(argv)
    shape = {k: getattr(args, k) for k in ("experts", "topk", "layers", "hidden", "moe_inter", "vocab", "scheme")}
    work = Path(args.work)
    src = work / "model-{experts}x{layers}-h{hidden}".format(**shape)
    sizes = save_model(args, src)
    result = {"shape": {**shape, **sizes}, "command": "python scripts/bench_moe.py " + " ".join(sys.argv[1:]),
              "torch": torch.__version__, "quantize": [], "decode": None}

    def child(cli: list[str]) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", *cli], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "TQDM_DISABLE": "1"})
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    base = child(["baseline"])
    for name in args.paths:
        algo, extra = PATHS[name]
        out = work / f"out-{name.replace(' ', '-')}"
        cli = [str(src), "--scheme", args.scheme, "--algo", algo, "-o", str(out), "--overwrite", "--no-progress",
               "--format", "gptq", *extra]
        if algo != "rtn":
            cli += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", "4"]
        la = load_avg()
        r = child(cli)
        meta = json.loads((out / "wq.json").read_text())
        stats = [lr.get("stats", {}) for lr in meta["report"]["layers"].values()]
        row = {"path": name, "seconds": r["seconds"], "peak_rss": r["peak_rss"], "baseline_rss": base["peak_rss"],
               "layers": len(meta["report"]["layers"]), "expert_fallbacks": sum("hessian" in s for s in stats),
               "blocks_share": meta["coverage"]["blocks_share"], "size_after": meta["size_bytes"]["after"],
               "load_before": la, "load_after": load_avg()}
        print(json.dumps(row), flush=True)
        result["quantize"].append(row)
    la = load_avg()
    result["decode"] = {**decode(args), "load_before": la, "load_after": load_avg()}
    print(json.dumps(result["decode"]))
    outp = Path(args.out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    outp.with_suffix(".json").write_text(json.dumps(result, indent=1))
    outp.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    s = r["shape"]
    mib = 2**20
    lines = [f"# MoE on CPU: {s['experts']} experts (top-{s['topk']}) x {s['layers']} layers, hidden {s['hidden']}, "
             f"expert width {s['moe_inter']}, vocab {s['vocab']} ({s['params'] / 1e6:.0f}M parameters, "
             f"{s['bf16_bytes'] / mib:.0f} MiB in bf16)", "", f"`{r['command']}` (torch {r['torch']})", "",
             "| path | quantize s (whole process) | peak RSS | over the import baseline | checkpoint | expert fallbacks | "
             "blocks quantized | load avg before -> after |", "|---|---|---|---|---|---|---|---|"]
    for q in r["quantize"]:
        lines.append(f"| {q['path']} | {q['seconds']} | {q['peak_rss'] / mib:.0f} MiB | "
                     f"{(q['peak_rss'] - q['baseline_rss']) / mib:.0f} MiB | {q['size_after'] / mib:.0f} MiB | "
                     f"{q['expert_fallbacks']} | {q['blocks_share']:.1%} | {q['load_before']} -> {q['load_after']} |")
    d = r["decode"]
    lines += ["", f"Greedy decode, batch 1, {d['threads']} threads, median of rounds, bf16 / fp32 / quantized interleaved "
              f"in one process (load {d['load_before']} -> {d['load_after']}):", "", "| model | tokens/s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in d["tokens_per_s"].items()]
    lines += ["", f"quantized / faster dense: {d['speedup_vs_faster_dense']}x", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
