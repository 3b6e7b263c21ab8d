"""Peak memory and wall time of `python -m wq.quantize` vs model size: streamed (the default) vs loading the
model whole (--no-stream), on random Llama-shaped models saved in four safetensors shards.

    python scripts/bench_stream.py                                   # 8/16/32 blocks, hidden 2048, rtn gptq autoround
    python scripts/bench_stream.py --layers 4 --hidden 512 --algos rtn --out /tmp/b    # smoke run

Every quantization is a fresh process (`--child run`) that calls wq.quantize.main and reports its own
VmHWM (peak RSS) and wall time; the baseline is a fresh process that imports the same modules and
nothing else (`--child baseline`). Calibration: 8 x 256 tokens of the bundled Austen text (the random
models use SmolLM2's tokenizer and vocabulary, so the text is real tokens). The budget the issue sets:
peak RSS minus the baseline at most 3 decoder blocks' bf16 size plus the calibration stream
(samples x seqlen x hidden x 4 bytes, x2 for the quantized and full-precision streams of autoround).
Writes one JSON line per run to stdout and <out>.json / <out>.md. The load average is recorded with each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def make_model(path: Path, layers: int, hidden: int) -> dict:
    """A random Llama-shaped bf16 model (SmolLM2's vocabulary and tokenizer) in four shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wq.assets import resolve_model

    if (path / "config.json").exists():
        return json.loads((path / "shape.json").read_text())
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(hidden // 256, 1),
                      max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    total = sum(p.numel() * 2 for p in model.parameters())
    block = sum(p.numel() * 2 for p in model.model.layers[0].parameters())
    model.save_pretrained(path, max_shard_size=f"{total // 4 // 1000 + 1}KB")
    tok_src = Path(resolve_model(None))
    for f in tok_src.glob("tokenizer*"):
        shutil.copy2(f, path / f.name)
    shape = {"layers": layers, "hidden": hidden, "params": sum(p.numel() for p in model.parameters()),
             "bf16_bytes": total, "block_bytes": block, "shards": len(list(path.glob("*.safetensors")))}
    (path / "shape.json").write_text(json.dumps(shape))
    return shape


def child(argv: list[str]) -> None:
    kind = argv[0]
    t = time.perf_counter()
    if kind == "baseline":
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import wq.quantize  # noqa: F401
        import wq.stream  # noqa: F401
        rc = 0
    else:
        from wq.quantize import main

        rc = main(argv[1:])
    print(json.dumps({"rc": rc, "peak_rss": vm_hwm(), "seconds": round(time.perf_counter() - t, 2)}))


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return []
    p = argparse.ArgumentParser(prog="python scripts/bench_stream.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--algos", nargs="+", default=["rtn", "gptq", "autoround"])
    p.add_argument("--paths", nargs="+", default=["streamed", "whole"], choices=["streamed", "whole"])
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--iters", type=int, default=4, help="autoround iterations (time, not memory, grows with them)")
    p.add_argument("--work", default="/tmp/wq-bench-stream", help="where the random models and outputs go")
    p.add_argument("--out", default=str(ROOT / "docs" / "stream_bench"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = run_child(["baseline"])
    rows = []
    for layers in args.layers:
        src = work / f"llama-{layers}x{args.hidden}"
        shape = make_model(src, layers, args.hidden)
        for algo in args.algos:
            for path in args.paths:
                out = work / f"out-{layers}-{algo}-{path}"
                shutil.rmtree(out, ignore_errors=True)
                cli = [str(src), "--scheme", "W4G128", "--algo", algo, "-o", str(out), "--no-progress",
                       "--format", "gptq"]
                if algo != "rtn":
                    cli += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", "4"]
                if algo == "autoround":
                    cli += ["--iters", str(args.iters)]
                if path == "whole":
                    cli.append("--no-stream")
                la = load_avg()
                r = run_child(["run", *cli])
                stream = args.nsamples * args.seqlen * args.hidden * 4 * (2 if algo == "autoround" else 1) if algo != "rtn" else 0
                row = {**shape, "algo": algo, "path": path, "seconds": r["seconds"], "peak_rss": r["peak_rss"],
                       "baseline_rss": base["peak_rss"], "over_baseline": r["peak_rss"] - base["peak_rss"],
                       "budget": 3 * shape["block_bytes"] + stream, "calib_stream": stream, "load_before": la,
                       "load_after": load_avg()}
                row["within_budget"] = row["over_baseline"] <= row["budget"]
                print(json.dumps(row), flush=True)
                rows.append(row)
                shutil.rmtree(out, ignore_errors=True)
    outp = Path(args.out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/bench_stream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    outp.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    outp.with_suffix(".md").write_text(markdown(cmd, rows))
    return rows


def markdown(cmd: str, rows: list[dict]) -> str:
    mib = 2**20
    lines = [f"`{cmd}`", "", "| blocks | model bf16 | block bf16 | algo | path | wall s | peak RSS | over baseline | "
             "budget (3 blocks + stream) | within | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['bf16_bytes'] / mib:.0f} MiB | {r['block_bytes'] / mib:.0f} MiB | {r['algo']} | "
                     f"{r['path']} | {r['seconds']} | {r['peak_rss'] / mib:.0f} MiB | {r['over_baseline'] / mib:.0f} MiB | "
                     f"{r['budget'] / mib:.0f} MiB | {'yes' if r['within_budget'] else 'no'} | {r['load_before']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
