"""End-to-end greedy decode tokens/s of a Llama-3-8B-shaped model (random weights) per scheme vs bf16.

    python scripts/bench_decode.py                                   # GPU: 8B shape, bf16 + W4G128/W3G128/W2G128, batch 1 and 16
    python scripts/bench_decode.py --device cpu --tiny --new-tokens 8  # CPU smoke run

Each scheme rebuilds the same random model (same seed), quantizes its decoder Linears with RTN
(lm_head stays dense, as wq's default skip list), and decodes greedily with a static KV cache.
With --compile (default on CUDA) the forward is torch.compile'd (mode reduce-overhead: CUDA
graphs); the quantized matmul is the custom op `wq::dequant_matmul`, so the graph holds. Decode
tokens/s = batch * new tokens / (time of generate(new tokens) - time of generate(1 token)), i.e.
prefill excluded. Writes JSON + markdown next to each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wq  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=256, intermediate_size=576, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)


def build(args, dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**cfg, torch_dtype=dtype)).to(dtype)
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def decode_tps(model, args, batch: int) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, args.prompt), device=args.device)
    kw = dict(do_sample=False, pad_token_id=0, cache_implementation="static")

    def run(n: int) -> float:
        sync(args.device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(args.device)
        return time.perf_counter() - t

    run(args.new_tokens)  # warm-up: compile, CUDA graphs, kernel repacking
    t_prefill = min(run(1) for _ in range(2))
    t_full = min(run(args.new_tokens) for _ in range(args.repeats))
    decode = max(t_full - t_prefill, 1e-9)
    return {"batch": batch, "tokens_per_s": batch * (args.new_tokens - 1) / decode,
            "ms_per_step": decode / (args.new_tokens - 1) * 1e3, "prefill_s": t_prefill}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama (CPU smoke test)")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder blocks")
    p.add_argument("--schemes", default="BF16,W4G128,W3G128,W2G128")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the forward (default: on for cuda)")
    p.add_argument("-o", "--out", default=None, help="output stem (default docs/bench/decode_<device>)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("bench_decode")
    compile_ = args.compile if args.compile is not None else args.device == "cuda"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for scheme in args.schemes.split(","):
        model = build(args, dtype)
        if scheme.upper() not in ("BF16", "FP32", "DENSE"):
            wq.quantize_model(model, scheme, algo="rtn", progress=False)
        if compile_:
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        for b in batches:
            r = {"scheme": scheme, **decode_tps(model, args, b)}
            rows.append(r)
            log.info("%-8s batch %-3d %8.1f tok/s  %.2f ms/step", scheme, b, r["tokens_per_s"], r["ms_per_step"])
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["scheme"] == args.schemes.split(",")[0]}
    for r in rows:
        r["speedup_vs_first"] = r["tokens_per_s"] / base[r["batch"]]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {"device_name": name, "torch": torch.__version__, "dtype": str(dtype).split(".")[-1], "compile": compile_,
            "model": "tiny" if args.tiny else "llama-3-8b-shaped", "layers": args.layers,
            "prompt": args.prompt, "new_tokens": args.new_tokens,
            "command": " ".join(["python scripts/bench_decode.py"] + (argv if argv is not None else sys.argv[1:]))}
    lines = [f"Device: {name}; torch {meta['torch']}; {meta['model']} (layers {args.layers or 'all'}); "
             f"dtype {meta['dtype']}; compile {compile_}; command: `{meta['command']}`", "",
             "| scheme | batch | tokens/s | ms/step | speedup vs " + args.schemes.split(",")[0] + " |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['scheme']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | "
              f"{r['speedup_vs_first']:.2f}x |" for r in rows]
    stem = Path(args.out or f"docs/bench/decode_{name.replace(' ', '_')}{'_tiny' if args.tiny else ''}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
