"""Perplexity of one quantized model through each CPU kernel, side by side (what the fast paths cost).

    python scripts/ppl_cpu_kernels.py --scheme W4G128 --kernels reference cpu_avx2_i8 aten_int4 --windows 40

The bundled model in fp32, RTN-quantized once; then the DESIGN.md CPU perplexity protocol (Pride and
Prejudice, seqlen 512, first --windows windows) with every QuantLinear pinned to one kernel at a time.
Kernels are run at every M here (their dispatch M limits are lifted for this measurement), so the
numbers isolate each kernel's arithmetic: reference = fp32 activations, cpu_avx2 = fp32 AVX2,
cpu_avx2_i8 = int8-rounded activations per segment, aten_int4 / aten_int8 = bf16 activations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from ppl_quick import load_fp32, perplexity, windows_for  # noqa: E402

import wq  # noqa: E402
from wq.kernels import KERNELS, force_kernel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="W4G128")
    ap.add_argument("--kernels", nargs="+", default=["reference", "cpu_avx2_i8", "cpu_avx2", "aten_int4"])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    model, tok = load_fp32(None)
    wq.quantize_model(model, a.scheme, progress=False)
    windows = windows_for(tok, "prideprejudice", a.seqlen, a.windows)
    rows = []
    for name in a.kernels:
        KERNELS._items[name] = dataclasses.replace(KERNELS.get(name), max_m=None)  # this measurement only
        force_kernel(name)
        t = time.perf_counter()
        r = perplexity(model.eval(), windows)
        rows.append({"scheme": a.scheme, "kernel": name, "ppl": r["ppl"], "seconds": time.perf_counter() - t})
        print(rows[-1], flush=True)
    force_kernel(None)
    if a.output:
        Path(a.output).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
