"""Per-call cost of one small layer at M = 1: dense F.linear / nn.Linear vs QuantLinear and the bare
extension call, best of --rounds x --calls back-to-back calls (weights stay in cache: this measures
call overhead, not weight reads; see bench_cpu.py for the kernels' throughput).

    python scripts/bench_call_overhead.py --shape 192 576 --scheme W4G128 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from bench_cpu import random_packed  # noqa: E402

from wq.kernels import cpu_native  # noqa: E402
from wq.nn.quant_linear import QuantLinear  # noqa: E402


def best_us(fn, calls: int, rounds: int) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


@torch.no_grad()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=[192, 576], metavar=("OUT", "IN"))
    ap.add_argument("--scheme", default="W4G128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    n, k = a.shape
    pw = random_packed(n, k, a.scheme)
    ql = QuantLinear.from_packed(pw)
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(1, k)
    st = cpu_native.prepare_native(pw)
    ext = cpu_native.extension()
    cands = {"F.linear fp32": lambda: F.linear(x, lin.weight), "nn.Linear fp32": lambda: lin(x),
             f"QuantLinear {a.scheme}": lambda: ql(x)}
    if ext is not None and st is not None:
        cands["extension call (gemv_i8)"] = lambda: ext.gemv_i8(x, st.w, st.scales, st.zs, pw.scheme.bits, st.group,
                                                                k + st.k_pad, st.perm, None)
    print(f"{n}x{k} M=1 {a.threads} thread(s), best of {a.rounds} x {a.calls} calls")
    for name, fn in cands.items():
        print(f"  {name:28s} {best_us(fn, a.calls, a.rounds):7.1f} us")


if __name__ == "__main__":
    main()
