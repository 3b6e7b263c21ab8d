"""Quality table rows: perplexity of rtn / gptq / ... at each scheme on the bundled model, CPU protocol.

Protocol (DESIGN.md): perplexity on Pride and Prejudice, seqlen 512, first 40 non-overlapping windows,
fp32 on CPU; calibration 32 x 512 token windows from Emma (seed 0); the model quantized in fp32.
Each (algo, scheme) starts from a fresh copy of the fp32 model. One JSON line per row is appended to
--out, and a markdown row printed.

    python scripts/quality_calib.py --algos rtn gptq --schemes W4G128 W3G128 W2G128 --out docs/quality.jsonl
    python scripts/quality_calib.py --algos autoround --schemes W3G128 --set iters=200 --out docs/quality.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the CPU protocol is fp32: pin the reference kernel (fast CPU kernels use bf16 activations)
os.environ.setdefault("WQ_KERNEL", "reference")

import ppl_quick  # noqa: E402
import torch  # noqa: E402
from compare_autoround import dequantized_copy_  # noqa: E402

import wq  # noqa: E402


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--schemes", nargs="+", default=["W4G128", "W3G128", "W2G128", "W4G-1"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra algorithm settings")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (the CPU tables use 1)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration/algorithm seeds, one row each")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    extra = {k: _value(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    if a.threads:
        torch.set_num_threads(a.threads)

    base, tok = ppl_quick.load_fp32()
    win = ppl_quick.windows_for(tok, "prideprejudice", a.seqlen, a.windows)

    def emit(row: dict) -> None:
        print(f"| {row['scheme']} | {row['algo']} {row.get('settings', '')} | {row['ppl']:.3f} | {row.get('quant_s', 0):.0f} |", flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    if not a.no_baseline:
        r = ppl_quick.perplexity(base, win)
        emit({"scheme": "BF16", "algo": "-", **r})
    for scheme in a.schemes:
        for algo in a.algos:
            for seed in a.seeds:
                m = copy.deepcopy(base)
                load0 = os.getloadavg()
                t, cpu = time.perf_counter(), time.process_time()
                calib = {"nsamples": a.nsamples, "seqlen": a.seqlen, "seed": seed} if algo != "rtn" else {}
                settings = {**calib, **extra}
                rep = wq.quantize_model(m, scheme, algo=algo, calib="emma", tokenizer=tok, progress=False, **settings)
                qs, qcpu = time.perf_counter() - t, time.process_time() - cpu
                dequantized_copy_(m)  # the reference kernel's math, dequantized once instead of per forward
                r = ppl_quick.perplexity(m, win)
                emit({"scheme": scheme, "algo": algo, "settings": settings, "quant_s": qs, "quant_cpu_s": qcpu,
                      "load_avg_start": load0, "load_avg_end": os.getloadavg(), "threads": torch.get_num_threads(),
                      "bits": getattr(m, "wq_quant", {}).get("bits_budget"),
                      "peak_memory_bytes": rep.peak_memory_bytes, "mean_rel_error": rep.mean_error, **r})
                del m


if __name__ == "__main__":
    main()
