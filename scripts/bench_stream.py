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


# the CLI picks model-free for rtn whenever it applies: the other two paths must turn it off
PATH_FLAGS = {"model-free": [], "streamed": ["--no-model-free"], "whole": ["--no-model-free", "--no-stream"]}


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
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of a 3 GB model in this process
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
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


class PeakTracer:
    """A thread sampling the resident set every few milliseconds, remembering what the run was doing at the
    peak: the last log line of the `wq` loggers, or the phase of the run (loading, calibrating, assembling,
    saving: entry and exit of those functions are marked). At the peak it also splits the resident set into
    anonymous memory (tensors) and file-backed pages (memory-mapped safetensors shards, reclaimable)."""

    PHASES = [("wq.quantize", "load_model", "load whole model"), ("wq", "save", "save (whole model)"),
              ("wq.stream", "assemble", "assemble"), ("wq.model_free", "assemble", "assemble"),
              ("wq.stream", "quantize_calibrated", "calibrate"), ("wq.stream", "_data_free", "rtn blocks"),
              ("wq.model_free", "quantize_model_free", "model-free")]

    def __init__(self, every: float = 0.005):
        import importlib
        import logging
        import threading

        self.every, self.peak, self.phase, self.at, self.last = every, 0, "", 0.0, "start"
        self.anon_at_peak = self.file_at_peak = self.peak_anon = 0
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        tracer = self

        class Handler(logging.Handler):
            def emit(self, record):
                tracer.last = record.getMessage().splitlines()[0][:100]

        logging.getLogger("wq").addHandler(Handler(logging.INFO))  # not the root: the CLI's basicConfig stays
        for mod_name, attr, label in self.PHASES:
            mod = importlib.import_module(mod_name)
            setattr(mod, attr, self._marked(getattr(mod, attr), label))
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _marked(self, fn, label):
        def wrapper(*a, **kw):
            self.last = f"in {label}"
            try:
                return fn(*a, **kw)
            finally:
                self.last = f"after {label}"
        return wrapper

    def _run(self):
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                fields = f.read().split()
                rss, shared = int(fields[1]) * self._page, int(fields[2]) * self._page  # shared: file-backed
                self.peak_anon = max(self.peak_anon, rss - shared)
                if rss > self.peak:
                    self.peak, self.phase, self.at = rss, self.last, time.perf_counter() - self.t0
                    self.anon_at_peak, self.file_at_peak = rss - shared, shared
                time.sleep(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"sampled_peak": self.peak, "peak_after": self.phase, "peak_at_s": round(self.at, 2),
                "anon_at_peak": self.anon_at_peak, "file_at_peak": self.file_at_peak, "peak_anon": self.peak_anon}


def child(argv: list[str]) -> None:
    kind = argv[0]
    t = time.perf_counter()
    traced = {}
    if kind == "baseline":  # the interpreter with what a run imports, and nothing loaded
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import wq.quantize  # noqa: F401
        import wq.stream  # noqa: F401
        rc = 0
    else:
        from wq.quantize import main

        tracer = PeakTracer()
        rc = main(argv[1:])
        traced = tracer.stop()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: less sensitive than wall time to a shared machine
    print(json.dumps({"rc": rc, "peak_rss": vm_hwm(), "seconds": round(time.perf_counter() - t, 2),
                      "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2), **traced}))


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


TINY = (2, 64)  # the baseline model: the same vocabulary and code paths, next to nothing in the blocks


def _run(work: Path, src: Path, algo: str, path: str, args) -> dict:
    out = work / f"out-{src.name}-{algo}-{path}"
    shutil.rmtree(out, ignore_errors=True)
    cli = [str(src), "--scheme", "W4G128", "--algo", algo, "-o", str(out), "--no-progress", "--format", "gptq"]
    if algo != "rtn":
        cli += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", "4"]
    if algo == "autoround":
        cli += ["--iters", str(args.iters)]
    r = run_child(["run", *cli, *PATH_FLAGS[path], *args.flags])
    shutil.rmtree(out, ignore_errors=True)
    return r


def main(argv=None) -> list[dict]:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return []
    p = argparse.ArgumentParser(prog="python scripts/bench_stream.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--algos", nargs="+", default=["rtn", "gptq", "autoround"])
    p.add_argument("--paths", nargs="+", default=["model-free", "streamed", "whole"], choices=list(PATH_FLAGS),
                   help="model-free applies to rtn only (other algorithms skip it)")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--iters", type=int, default=4, help="autoround iterations (time, not memory, grows with them)")
    p.add_argument("--flags", nargs="*", default=[], metavar="FLAG",
                   help="more wq.quantize flags for every run, baseline included (e.g. --flags=--low-mem)")
    p.add_argument("--work", default="/tmp/wq-bench-stream", help="where the random models and outputs go")
    p.add_argument("--out", default=str(ROOT / "docs" / "stream_bench"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    imports = run_child(["baseline"])
    tiny = make_model(work / f"llama-{TINY[0]}x{TINY[1]}", *TINY)
    rows = []
    baselines: dict[tuple[str, str], dict] = {}
    for layers in args.layers:
        src = work / f"llama-{layers}x{args.hidden}"
        shape = make_model(src, layers, args.hidden)
        for algo in args.algos:
            for path in args.paths:
                if path == "model-free" and algo != "rtn":
                    continue
                if (algo, path) not in baselines:  # also warms the caches (calibration text, tokenizer)
                    baselines[algo, path] = _run(work, work / f"llama-{TINY[0]}x{TINY[1]}", algo, path, args)
                base = baselines[algo, path]
                la = load_avg()
                r = _run(work, src, algo, path, args)
                # the calibration stream as the pipeline holds it: one set of fp32 activations, x2 while a
                # block's outputs are recomputed (x4 for autoround: the full-precision stream and targets too)
                acts = args.nsamples * args.seqlen * args.hidden * 4
                stream = 0 if algo == "rtn" else acts * (4 if algo == "autoround" else 2)
                row = {**shape, "algo": algo, "path": path, "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "peak_rss": r["peak_rss"],
                       "peak_after": r.get("peak_after"), "peak_at_s": r.get("peak_at_s"),
                       "anon_at_peak": r.get("anon_at_peak"), "file_at_peak": r.get("file_at_peak"),
                       "peak_anon": r.get("peak_anon"), "baseline_anon": base.get("peak_anon"),
                       "import_rss": imports["peak_rss"], "baseline_rss": base["peak_rss"],
                       "baseline_seconds": base["seconds"], "tiny_model_bytes": tiny["bf16_bytes"],
                       "over_baseline": r["peak_rss"] - base["peak_rss"],
                       "budget": 3 * shape["block_bytes"] + stream, "calib_stream": stream, "load_before": la,
                       "load_after": load_avg(), "threads": os.environ.get("OMP_NUM_THREADS", "default"),
                       "flags": " ".join(args.flags)}
                row["within_budget"] = row["over_baseline"] <= row["budget"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    outp = Path(args.out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/bench_stream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    outp.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    outp.with_suffix(".md").write_text(markdown(cmd, rows))
    return rows


def markdown(cmd: str, rows: list[dict]) -> str:
    mib = 2**20
    lines = [f"`{cmd}`", "",
             "| blocks | model bf16 | block bf16 | outside bf16 | algo | path | wall s | CPU s | peak RSS | baseline | "
             "over baseline | budget (3 blocks + stream) | within | at the peak: anon / file-backed | peak anon over "
             "baseline | peak during | load avg before |",
             "|" + "---|" * 17]
    for r in rows:
        outside = r["bf16_bytes"] - r["layers"] * r["block_bytes"]
        anon = "" if r.get("anon_at_peak") is None else f"{r['anon_at_peak'] / mib:.0f} / {r['file_at_peak'] / mib:.0f} MiB"
        anon_over = ("" if r.get("peak_anon") is None or r.get("baseline_anon") is None
                     else f"{(r['peak_anon'] - r['baseline_anon']) / mib:.0f} MiB")
        lines.append(f"| {r['layers']} | {r['bf16_bytes'] / mib:.0f} MiB | {r['block_bytes'] / mib:.0f} MiB | "
                     f"{outside / mib:.0f} MiB | {r['algo']} | {r['path']}{' ' + r['flags'] if r.get('flags') else ''} | {r['seconds']} | {r['cpu_seconds']} | "
                     f"{r['peak_rss'] / mib:.0f} MiB | {r['baseline_rss'] / mib:.0f} MiB | "
                     f"{r['over_baseline'] / mib:.0f} MiB | {r['budget'] / mib:.0f} MiB | "
                     f"{'yes' if r['within_budget'] else 'no'} | {anon} | {anon_over} | "
                     f"{(r.get('peak_after') or '').replace('|', '/')[:40]} | {r['load_before']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
