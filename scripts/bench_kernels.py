"""Packed-weight matmul vs torch bf16 F.linear, on Llama-3-8B layer shapes, in one process.

    python scripts/bench_kernels.py                        # GPU: full grid, writes docs/bench/kernels_<gpu>.{json,md}
    python scripts/bench_kernels.py --device cpu --quick   # smoke run on CPU, small shapes

Protocol: for each (shape N x K, scheme, M) the quantized call and the bf16 F.linear are timed
interleaved (ours, baseline, ours, ...) so machine noise hits both. L2 is defeated by rotating
over enough weight copies that they do not fit in L2 (both for bf16 and packed weights).
On CUDA, eager time (launch overhead included) and CUDA-graph replay time (launches captured)
are both reported. Ideal speedup = 16 / bits per weight (memory bound, batch 1); fraction =
measured / ideal. GB/s counts weight bytes as stored + activations in + outputs out.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from wq.kernels import dispatch  # noqa: E402
from wq.packing import PackedWeight, pack  # noqa: E402
from wq.scheme import QuantScheme  # noqa: E402

LLAMA3_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]  # N x K
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
SCHEMES = ["W4G128", "W3G128", "W2G128", "W4G-1", "W8G-1"]
L2_BYTES = 50 * 2**20  # H100: 50 MB; rotating 2x that defeats it


def random_packed(scheme: QuantScheme, n: int, k: int, device: str) -> PackedWeight:
    """Random codes, fp16 scales and zeros (speed does not depend on the values)."""
    q = torch.randint(0, 2**scheme.bits, (k, n), dtype=torch.int32, device=device)
    ng = scheme.n_groups(k)
    zeros = torch.full((ng, n), 2 ** (scheme.bits - 1), dtype=torch.uint8, device=device)
    if not scheme.sym:
        zeros = torch.randint(0, 2**scheme.bits, (ng, n), dtype=torch.uint8, device=device)
    scales = (torch.rand(ng, n, device=device) * 0.01 + 1e-3).to(torch.float16)
    return PackedWeight(qweight=pack(q, scheme.bits, dim=0), scales=scales, zeros=zeros, scheme=scheme,
                        in_features=k, out_features=n)


def copies_for(nbytes: int, device: str, cap: int) -> int:
    if device != "cuda":
        return 2
    return max(2, min(cap, -(-2 * L2_BYTES // nbytes)))


class Timer:
    """Mean seconds per call of `fn(i)` (i = rotation index), eager and, on CUDA, graph-replayed."""

    def __init__(self, device: str, iters: int, repeats: int):
        self.device, self.iters, self.repeats = device, iters, repeats

    def eager(self, fn) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(self.iters):
                fn(i)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / self.iters
        t = time.perf_counter()
        for i in range(self.iters):
            fn(i)
        return (time.perf_counter() - t) / self.iters

    def graph(self, fn) -> float | None:
        if self.device != "cuda":
            return None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(3):
                fn(i)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(self.iters):
                fn(i)
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / self.iters

    def interleaved(self, fns: dict, mode: str) -> dict[str, float | None]:
        """Median over repeats, alternating the candidates inside each repeat."""
        times: dict[str, list] = {k: [] for k in fns}
        for _ in range(self.repeats):
            for name, fn in fns.items():
                times[name].append(self.eager(fn) if mode == "eager" else self.graph(fn))
        return {k: (None if v[0] is None else statistics.median(v)) for k, v in times.items()}


def bench_case(n: int, k: int, scheme: QuantScheme, ms: list[int], args, dtype: torch.dtype) -> list[dict]:
    dev = args.device
    base = [torch.randn(n, k, device=dev, dtype=dtype) for _ in range(copies_for(n * k * 2, dev, 64))]
    packed = [random_packed(scheme, n, k, dev) for _ in range(copies_for(base[0].numel() // 4, dev, 64))]
    caches = [{} for _ in packed]
    rows = []
    timer = Timer(dev, args.iters, args.repeats)
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=dtype)
        kernel = dispatch.select(x, packed[0]).name

        def ours(i, x=x):
            j = i % len(packed)
            return dispatch.matmul(x, packed[j], None, caches[j])

        def bf16(i, x=x):
            return F.linear(x, base[i % len(base)])

        ours(0)
        bf16(0)  # compile / repack outside the timings
        row = {"N": n, "K": k, "M": m, "scheme": str(scheme), "kernel": kernel, "dtype": str(dtype).split(".")[-1]}
        for mode in ("eager", "graph"):
            t = timer.interleaved({"ours": ours, "bf16": bf16}, mode)
            if t["ours"] is None:
                continue
            wbytes = packed[0].nbytes()
            io = (m * k + m * n) * x.element_size()
            row[mode] = {"ours_us": t["ours"] * 1e6, "bf16_us": t["bf16"] * 1e6,
                         "speedup": t["bf16"] / t["ours"], "ours_GBps": (wbytes + io) / t["ours"] / 1e9,
                         "bf16_GBps": (n * k * 2 + io) / t["bf16"] / 1e9}
        ideal = 16 / scheme.bits_per_weight(k)
        row["ideal_speedup"] = ideal
        best = row.get("graph") or row["eager"]
        row["fraction_of_ideal"] = best["speedup"] / ideal
        rows.append(row)
        log.info("%5dx%-5d %-8s M=%-4d %-14s eager %.2fx%s", n, k, scheme, m, kernel, row["eager"]["speedup"],
                 f"  graph {row['graph']['speedup']:.2f}x" if "graph" in row else "")
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    head = ["N x K", "scheme", "M", "kernel", "ours us", "dense us", "speedup", "GB/s", "ideal", "of ideal"]
    has_graph = any("graph" in r for r in rows)
    if has_graph:
        head[4:7] = ["ours us (graph)", "dense us (graph)", "speedup graph", "speedup eager"]
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}; dtype {meta['dtype']}; "
             f"command: `{meta['command']}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        best = r.get("graph") or r["eager"]
        cells = [f"{r['N']}x{r['K']}", r["scheme"], str(r["M"]), r["kernel"], f"{best['ours_us']:.1f}",
                 f"{best['bf16_us']:.1f}", f"{best['speedup']:.2f}x"]
        if has_graph:
            cells.append(f"{r['eager']['speedup']:.2f}x")
        cells += [f"{best['ours_GBps']:.0f}", f"{r['ideal_speedup']:.2f}x", f"{r['fraction_of_ideal']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and M (CPU smoke test)")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--shapes", default=None, help="NxK,NxK,... (default: Llama-3-8B layers)")
    p.add_argument("--ms", default=None, help="comma-separated M values")
    p.add_argument("--dtype", default=None, help="bfloat16 (cuda default) or float32 (cpu default)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernel", default=None, help="force one kernel (as WQ_KERNEL)")
    p.add_argument("-o", "--out", default=None, help="output stem (default docs/bench/kernels_<device>)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quick = args.quick
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else [(256, 512), (96, 576)] if quick else LLAMA3_8B_SHAPES)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else ([1, 16, 64] if quick else MS)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    args.iters = args.iters or (3 if quick else 50 if args.device == "cuda" else 10)
    args.repeats = 1 if quick else args.repeats
    if args.kernel:
        dispatch.force_kernel(args.kernel)
    rows = []
    for n, k in shapes:
        for s in args.schemes.split(","):
            rows += bench_case(n, k, QuantScheme.parse(s), ms, args, dtype)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {"device_name": name, "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
            "command": " ".join(["python scripts/bench_kernels.py"] + (argv if argv is not None else sys.argv[1:])),
            "iters": args.iters, "repeats": args.repeats, "l2_bytes_defeated": L2_BYTES}
    stem = Path(args.out or f"docs/bench/kernels_{name.replace(' ', '_')}{'_quick' if quick else ''}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(rows, meta)
    stem.with_suffix(".md").write_text(md)
    print(md)


log = logging.getLogger("bench_kernels")

if __name__ == "__main__":
    main()
