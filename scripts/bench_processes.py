"""Calibration across processes on the bundled model (SmolLM2-135M): one process vs
`torchrun --standalone --nproc-per-node 2 -m wq.quantize ...` (gloo on CPU). Are the checkpoints the same,
and how long does each take?

    python scripts/bench_processes.py                          # gptq + autoround, 8 x 512 from Emma, W4G128
    python scripts/bench_processes.py --algos gptq --nsamples 4 --seqlen 128 --windows 4 --out /tmp/p   # smoke

Runs (each a fresh process group, wall time measured around the command, OMP_NUM_THREADS as given per run):

    1x1   python -m wq.quantize ...                                        one process, 1 thread
    2x1   torchrun --standalone --nproc-per-node 2 -m wq.quantize ...      two processes, 1 thread each
    1x2   python -m wq.quantize ... with 2 threads (optional: --configs 1x1 2x1 1x2), the same cores as 2x1

Every rank's share of the 8 samples is 4 = one whole --batch-size 4 batch, the case in which gptq's summed
Hessians round exactly as one process's. Compared, checkpoint against the 1x1 one (native `wq` format):
the fraction of differing integer codes (unpacked), of differing scales and zero points, whether every
other tensor is equal, and the perplexity of each (Pride and Prejudice, seqlen 512, 40 windows, fp32,
reference kernel: DESIGN.md's CPU protocol) when the checkpoints differ.
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
sys.path.insert(0, str(ROOT / "scripts"))


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def command(config: str, args: list[str]) -> list[str]:
    procs = int(config.split("x")[0])
    if procs == 1:
        return [sys.executable, "-m", "wq.quantize", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
            "-m", "wq.quantize", *args]


def quantize(config: str, algo: str, out: Path, a) -> dict:
    threads = config.split("x")[1]
    args = ["default", "--scheme", a.scheme, "--algo", algo, "--calib", str(a.calib_file), "--nsamples",
            str(a.nsamples), "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size), "--format", "wq",
            "--no-progress", "-o", str(out), "--overwrite"]
    if algo == "autoround":
        args += ["--iters", str(a.iters)]
    cmd = command(config, args)
    la = load_avg()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": threads, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-4000:]}")
    ranks = [ln.split("INFO", 1)[-1].strip() for ln in p.stderr.splitlines() if "takes samples" in ln]
    printable = " ".join(("python" if c == sys.executable else c) for c in cmd)
    return {"config": config, "algo": algo, "seconds": round(seconds, 1), "load_before": la,
            "load_after": load_avg(), "command": f"OMP_NUM_THREADS={threads} {printable}", "rank_log": ranks}


def tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(a_dir: Path, b_dir: Path) -> dict:
    """Codes, scales and zero points of every quantized layer of b against a; other tensors: equal or not."""
    import torch

    from wq.packing import unpack

    meta = json.loads((a_dir / "wq.json").read_text())
    bits = {n: int(s[1]) for n, s in meta["layers"].items()}  # "W4G128..." -> 4
    a, b = tensors(a_dir), tensors(b_dir)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    codes = diff_codes = scales = diff_scales = zeros = diff_zeros = 0
    other_equal, worst = True, (0.0, "")
    for k in a:
        layer, _, leaf = k.rpartition(".")
        if leaf == "qweight":
            n_in = a[f"{layer}.g_idx"].numel()
            ca, cb = unpack(a[k], bits[layer], n_in, dim=0), unpack(b[k], bits[layer], n_in, dim=0)  # [in, out]
            d = int((ca != cb).sum())
            codes += ca.numel()
            diff_codes += d
            worst = max(worst, (d / ca.numel(), layer))
        elif leaf == "scales":
            scales += a[k].numel()
            diff_scales += int((a[k] != b[k]).sum())
        elif leaf == "qzeros":
            za, zb = unpack(a[k], bits[layer], a[f"{layer}.scales"].shape[1], dim=1), unpack(
                b[k], bits[layer], a[f"{layer}.scales"].shape[1], dim=1)
            zeros += za.numel()
            diff_zeros += int((za != zb).sum())
        elif not torch.equal(a[k], b[k]):
            other_equal = False
    identical = all(torch.equal(a[k], b[k]) for k in a)
    return {"identical": identical, "codes_differing": diff_codes / max(codes, 1), "codes": codes,
            "scales_differing": diff_scales / max(scales, 1), "zeros_differing": diff_zeros / max(zeros, 1),
            "other_tensors_equal": other_equal, "worst_layer": worst[1], "worst_layer_codes_differing": worst[0]}


def perplexity(d: Path, windows: int) -> dict:
    """In a fresh process (reference kernel, fp32)."""
    code = ("import json,sys,torch,wq; sys.path.insert(0,'scripts'); from ppl_quick import perplexity, windows_for;"
            "from transformers import AutoTokenizer;"
            f"m=wq.load({str(d)!r}, dtype=torch.float32); tok=AutoTokenizer.from_pretrained({str(d)!r});"
            f"print(json.dumps(perplexity(m, windows_for(tok, 'prideprejudice', 512, {windows}))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "WQ_KERNEL": "reference"})
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python scripts/bench_processes.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--algos", nargs="+", default=["gptq", "autoround"])
    p.add_argument("--configs", nargs="+", default=["1x1", "2x1"], help="<processes>x<threads each>; the first is "
                   "the reference the others are compared with")
    p.add_argument("--scheme", default="W4G128")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=8, help="autoround iterations per block")
    p.add_argument("--windows", type=int, default=40, help="perplexity windows of 512 tokens (0: skip)")
    p.add_argument("--work", default="/tmp/wq-bench-processes")
    p.add_argument("--out", default=str(ROOT / "docs" / "processes_bench"))
    a = p.parse_args(argv)
    from wq.assets import load_book

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    a.calib_file = work / "emma.txt"
    a.calib_file.write_text(load_book("emma"))
    rows = []
    for algo in a.algos:
        dirs = {}
        for config in a.configs:
            dirs[config] = work / f"{algo}-{config}"
            row = quantize(config, algo, dirs[config], a)
            if config != a.configs[0]:
                row.update(compare(dirs[a.configs[0]], dirs[config]))
            print(json.dumps(row), flush=True)
            rows.append(row)
        if a.windows:
            ref_ppl = None
            for row in (r for r in rows if r["algo"] == algo):
                if row["config"] != a.configs[0] and row.get("identical"):
                    row["ppl"] = ref_ppl  # the same tensors: the same perplexity
                    continue
                row["ppl"] = perplexity(dirs[row["config"]], a.windows)
                ref_ppl = ref_ppl or row["ppl"]
                print(json.dumps({"algo": algo, "config": row["config"], "ppl": row["ppl"]}), flush=True)
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    cmd = "python scripts/bench_processes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": cmd, "settings": {k: str(v) for k, v in vars(a).items()}, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(cmd, a, rows))
    return result


def markdown(cmd: str, a, rows: list[dict]) -> str:
    lines = [f"`{cmd}`", "", f"Bundled SmolLM2-135M, {a.scheme}, calibration {a.nsamples} x {a.seqlen} from Emma, "
             f"--batch-size {a.batch_size}, autoround --iters {a.iters}; perplexity: Pride and Prejudice, seqlen 512, "
             f"{a.windows} windows, fp32, reference kernel.", "",
             "| algo | processes x threads | wall s | identical to 1x1 | codes differing | scales differing | "
             "zeros differing | other tensors equal | ppl | load avg before |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = r["config"] == a.configs[0]
        ppl = r.get("ppl")
        lines.append(f"| {r['algo']} | {r['config']} | {r['seconds']} | {'(reference)' if ref else r['identical']} | "
                     f"{'' if ref else format(r['codes_differing'], '.2e')} | "
                     f"{'' if ref else format(r['scales_differing'], '.2e')} | "
                     f"{'' if ref else format(r['zeros_differing'], '.2e')} | "
                     f"{'' if ref else r['other_tensors_equal']} | {'' if ppl is None else format(ppl['ppl'], '.4f')} | "
                     f"{r['load_before']} |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
