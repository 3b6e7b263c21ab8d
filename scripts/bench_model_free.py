"""Throughput of model-free rtn (wq.model_free: tensor by tensor through the shards, no model object) in GB/s
of bf16 input, next to a plain copy of the same shards on the same disk, with a cold and a warm page cache.

    python scripts/bench_model_free.py                          # 16 blocks, hidden 2048 (1.8 GB in bf16), W4G128
    python scripts/bench_model_free.py --layers 2 --hidden 256 --work /tmp/mf --out /tmp/mf/res   # smoke run

Every measurement is a fresh process (`--child`) timing only its operation (not the interpreter's start):

    copy        shutil.copyfile of every shard into a directory beside the source (same disk)
    read        every tensor read through wq.loading.shards.ShardReader, nothing else
    rtn math    the same reads, with rtn of each Linear weight timed on its own (the quantization math alone)
    model-free  wq.model_free.quantize_model_free(source, scheme, out, formats=["gptq"]): read, quantize, stage,
                assemble, write: what `python -m wq.quantize SRC --scheme W4G128 --format gptq` runs for rtn

Cold cache: before each run the source shards' pages are dropped from the page cache with
posix_fadvise(DONTNEED) (needs no root; on a virtual machine the host may still cache the file, which the
results say). Warm: every shard is read once first. Written files are not fsynced by wq nor by the copy:
the "synced" column adds an fsync of every written file after the operation (the data is then on disk).
GB/s = bf16 input bytes (the shards' size) / seconds. One JSON line per run, then <out>.json / <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

OPS = ("copy", "read", "model-free")


def shards(src: Path) -> list[Path]:
    return sorted(src.glob("*.safetensors"))


def drop_cache(files: list[Path]) -> None:
    """Evict the files' clean pages from the page cache (POSIX_FADV_DONTNEED; no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def cached_fraction(files: list[Path]) -> float:
    """Share of the files' pages in the page cache (util-linux fincore), or -1 when it cannot tell."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return -1.0
    res, size = sum(int(x) for x in out[0::2]), sum(int(x) for x in out[1::2])
    return res / max(size, 1)


def fsync_tree(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def child(op: str, src: Path, dst: Path, scheme: str) -> dict:
    import torch

    shutil.rmtree(dst, ignore_errors=True)
    out: dict = {}
    if op == "copy":
        t = time.perf_counter()
        dst.mkdir(parents=True)
        for f in shards(src):
            shutil.copyfile(f, dst / f.name)
        out["seconds"] = time.perf_counter() - t
        fsync_tree(dst)
        out["synced_seconds"] = time.perf_counter() - t
    elif op == "read":
        from wq.algorithms import ALGORITHMS
        from wq.loading.shards import ShardReader
        from wq.model_free import plan_tensors

        reader = ShardReader(src)
        plan, _ = plan_tensors(reader, scheme)
        rtn = ALGORITHMS.get("rtn")()
        read_s = math_s = 0.0
        math_bytes = 0
        for name in sorted(reader.names(), key=lambda n: (reader.file_of(n), n)):
            t = time.perf_counter()
            w = reader.get(name)
            read_s += time.perf_counter() - t
            module = name.rpartition(".")[0]
            if module in plan and name.endswith(".weight"):
                t = time.perf_counter()
                rtn.quantize_weight(w, plan[module])
                math_s += time.perf_counter() - t
                math_bytes += w.numel() * w.element_size()
        out.update(seconds=read_s, math_seconds=math_s, math_bytes=math_bytes)
    elif op == "model-free":
        from wq.model_free import quantize_model_free

        t = time.perf_counter()
        res = quantize_model_free(src, scheme, dst, formats=["gptq"], progress=False)
        out["seconds"] = time.perf_counter() - t
        out["loop_seconds"] = res["report"].seconds  # read + quantize + stage (before the assembly)
        fsync_tree(dst)
        out["synced_seconds"] = time.perf_counter() - t
        out["written_bytes"] = sum(f.stat().st_size for f in dst.rglob("*.safetensors"))
    else:
        raise ValueError(op)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            out["peak_rss"] = int(line.split()[1]) * 1024
    out["threads"] = torch.get_num_threads()
    shutil.rmtree(dst, ignore_errors=True)
    return out


def run_child(op: str, src: Path, dst: Path, scheme: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", op, str(src), str(dst), scheme], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
    if p.returncode != 0:
        raise RuntimeError(f"child {op} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        op, src, dst, scheme = sys.argv[2:6]
        print(json.dumps(child(op, Path(src), Path(dst), scheme)))
        return []
    from bench_stream import load_avg, make_model

    p = argparse.ArgumentParser(prog="python scripts/bench_model_free.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--scheme", default="W4G128")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--caches", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    p.add_argument("--work", default="/tmp/wq-bench-stream", help="where the random model (shared with "
                   "bench_stream.py) and the outputs go")
    p.add_argument("--out", default=str(ROOT / "docs" / "model_free_bench"))
    args = p.parse_args(argv)
    work = Path(args.work)
    src = work / f"llama-{args.layers}x{args.hidden}"
    shape = make_model(src, args.layers, args.hidden)
    files = shards(src)
    nbytes = sum(f.stat().st_size for f in files)
    rows = []
    for cache in args.caches:
        for rep in range(args.repeats):
            for op in OPS:
                if cache == "cold":
                    drop_cache(files)
                else:
                    warm_cache(files)
                frac = cached_fraction(files)
                la = load_avg()
                r = run_child(op, src, work / f"mf-{op}", args.scheme)
                row = {"op": op, "cache": cache, "repeat": rep, "input_bytes": nbytes, "cached_before": round(frac, 3),
                       "load_before": la, "load_after": load_avg(), **r, "gb_s": nbytes / r["seconds"] / 1e9}
                if "synced_seconds" in r:
                    row["gb_s_synced"] = nbytes / r["synced_seconds"] / 1e9
                if "math_seconds" in r:
                    row["math_gb_s"] = r["math_bytes"] / max(r["math_seconds"], 1e-9) / 1e9
                print(json.dumps(row), flush=True)
                rows.append(row)
    cmd = "python scripts/bench_model_free.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "shape": shape, "input_bytes": nbytes,
                                                    "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(cmd, shape, nbytes, rows))
    return rows


def markdown(cmd: str, shape: dict, nbytes: int, rows: list[dict]) -> str:
    def med(key, op, cache):
        vals = [r[key] for r in rows if r["op"] == op and r["cache"] == cache and key in r]
        return statistics.median(vals) if vals else None

    lines = [f"`{cmd}`", "", f"Source: {shape['layers']} blocks, hidden {shape['hidden']}, {nbytes / 1e9:.2f} GB of bf16 "
             f"in {shape['shards']} shards. Medians of {max(r['repeat'] for r in rows) + 1} "
             "runs; GB = 1e9 bytes of bf16 input per second.", "",
             "| cache | operation | seconds | GB/s | GB/s incl. fsync | rtn math alone GB/s | peak RSS | threads | "
             "load avg (first run) |", "|---|---|---|---|---|---|---|---|---|"]
    for cache in dict.fromkeys(r["cache"] for r in rows):
        for op in OPS:
            s = med("seconds", op, cache)
            if s is None:
                continue
            first = next(r for r in rows if r["op"] == op and r["cache"] == cache)
            synced = med("gb_s_synced", op, cache)
            math = med("math_gb_s", op, cache)
            lines.append(f"| {cache} | {op} | {s:.2f} | {nbytes / s / 1e9:.2f} | "
                         f"{'' if synced is None else f'{synced:.2f}'} | {'' if math is None else f'{math:.2f}'} | "
                         f"{med('peak_rss', op, cache) / 2**20:.0f} MiB | {first['threads']} | {first['load_before']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
