"""Seconds per decoder block of each algorithm on the bundled model, and what that implies for an 8B model.

Captures the inputs of one real SmolLM2 block (block 15) on `--nsamples` x `--seqlen` Emma tokens, then
times each algorithm on that block alone (the pipeline's own per-block work, the fp targets and the
recompute of the quantized outputs, timed separately as "pipeline"). One torch thread unless --threads.
Prints a table and writes JSON. The 8B column is an ESTIMATE: measured seconds scaled by the ratio of
per-block matmul FLOPs (Llama-3-8B block vs SmolLM2 block, same tokens and settings) and by the ratio of
this CPU's measured fp32 throughput (the block's forward) to an assumed sustained GPU fp32 throughput
(--gpu-tflops); Python overhead and small kernels are ignored, so it is a lower bound, not a measurement.

    python scripts/time_per_block.py --algos rtn gptq awq awq:quantizer=gptq autoround:iters=50 recon:iters=50 \\
        -o docs/results/time_per_block.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from ppl_quick import load_fp32  # noqa: E402

from wq.algorithms import ALGORITHMS  # noqa: E402
from wq.calib.data import calibration_samples  # noqa: E402
from wq.calib.pipeline import block_output  # noqa: E402
from wq.scheme import QuantScheme  # noqa: E402


def block_matmul_flops(hidden: int, inter: int, heads: int, kv: int, head_dim: int, tokens: int, seq: int) -> float:
    """Forward FLOPs of one Llama-style block on `tokens` tokens in sequences of `seq` (2 per MAC)."""
    proj = hidden * (heads * head_dim) * 2 + hidden * (kv * head_dim) * 2 + 3 * hidden * inter
    attn = 2 * heads * head_dim * seq  # QK^T and AV per token, causal mean ~ seq/2 each
    return 2.0 * tokens * (proj + attn)


def _parse(spec: str):
    name, *kv = spec.split(":")
    settings = {}
    for item in kv:
        k, v = item.split("=", 1)
        settings[k] = int(v) if v.lstrip("-").isdigit() else (float(v) if v.replace(".", "", 1).isdigit() else v)
    return name, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", nargs="+", default=["rtn", "gptq", "awq", "autoround:iters=50", "recon:iters=50"])
    ap.add_argument("--scheme", default="W3G128")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gpu-tflops", type=float, default=40.0,
                    help="assumed sustained fp32 GPU throughput for the 8B estimate (default 40 TFLOP/s)")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_fp32()
    samples = calibration_samples("emma", tok, nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    block = model.model.layers[a.layer]
    cap = []

    def hook(mod, args, kw):
        cap.append((args[0].detach(), {k: v for k, v in kw.items() if k in ("position_embeddings", "attention_mask",
                                                                             "position_ids")}))
        raise StopIteration

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for j in range(0, samples.shape[0], 8):
            try:
                model(samples[j:j + 8], use_cache=False)
            except StopIteration:
                pass
    h.remove()
    inputs, kwargs = [c[0] for c in cap], [c[1] for c in cap]
    t, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        targets = [block_output(block(x, **kw)) for x, kw in zip(inputs, kwargs)]
    forward_s = time.process_time() - cpu  # CPU seconds: the machine is shared, wall time depends on the load
    pipeline = {"algo": "pipeline (fp targets + recompute)", "seconds": 2 * (time.perf_counter() - t),
                "cpu_seconds": 2 * forward_s}
    cfg = model.config
    small = block_matmul_flops(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                               cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, 1, a.seqlen)
    big = block_matmul_flops(4096, 14336, 32, 8, 128, 1, a.seqlen)
    ratio = big / small
    cpu_gflops = small * a.nsamples * a.seqlen / forward_s / 1e9
    to_gpu = ratio * cpu_gflops / (a.gpu_tflops * 1e3)  # CPU seconds on SmolLM2 -> GPU seconds on an 8B block
    plan = {n: QuantScheme.parse(a.scheme) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = [pipeline]
    for spec in a.algos:
        name, settings = _parse(spec)
        algo = ALGORITHMS.get(name)(**settings)
        b = copy.deepcopy(block)
        t, cpu = time.perf_counter(), time.process_time()
        if algo.granularity == "block" and algo.needs_calibration:
            algo.quantize_block(b, plan, inputs, kwargs, targets)
        elif algo.needs_calibration:
            from wq.algorithms.hessian import block_hessians

            H = block_hessians(b, list(plan), inputs, kwargs)
            for n, s in plan.items():
                algo.quantize_weight(b.get_submodule(n).weight.detach(), s, H=H[n])
        else:
            for n, s in plan.items():
                algo.quantize_weight(b.get_submodule(n).weight.detach(), s)
        rows.append({"algo": spec, "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu})
        print(rows[-1], flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "scheme": a.scheme, "layer": a.layer, "nsamples": a.nsamples,
            "seqlen": a.seqlen, "threads": a.threads, "load_average": os.getloadavg(), "flops_ratio_8b": ratio,
            "cpu_gflops_measured": cpu_gflops, "gpu_tflops_assumed": a.gpu_tflops}
    print(f"\n{a.scheme}, block {a.layer}, {a.nsamples} x {a.seqlen} tokens, {a.threads} thread(s), load "
          f"{meta['load_average'][0]:.1f}; CPU {cpu_gflops:.1f} GFLOP/s measured; 8B ESTIMATE = seconds x {ratio:.0f} "
          f"(FLOPs) x {cpu_gflops:.1f} / {a.gpu_tflops * 1e3:g} (GFLOP/s, assumed GPU) x 32 blocks, same settings")
    print("| algorithm | CPU s / block (SmolLM2) | wall s / block | 30 blocks, CPU (min) | 8B on one GPU, ESTIMATE "
          "(min) |\n|---|---|---|---|---|")
    for r in rows:
        est = r["cpu_seconds"] * to_gpu * 32 / 60
        r["est_8b_gpu_minutes"] = est
        print(f"| {r['algo']} | {r['cpu_seconds']:.1f} | {r['seconds']:.1f} | {r['cpu_seconds'] * 30 / 60:.1f} | "
              f"{est:.2f} |")
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
