"""The steps of scripts/gpu_check.sh (the first command to run on a machine with a GPU), as data.

    python scripts/gpu_check.py [--dry-run] [--fast] [--out DIR] [--only a,b] [--skip a,b] [--budget 600]

Each step is a command with a timeout, run in order of importance; its log goes to OUT/logs/<step>.log
and its status (ok / failed / timeout / skipped, with the reason) into OUT/gpu_check.{json,md}, with
the device name, versions and the headline numbers (the batch-1 speedup targets of issue 4/19).
OUT defaults to docs/gpu/<device>/. A step that needs CUDA is skipped, with the reason, when there is
none; `--dry-run` runs every step in its CPU form (small shapes, the interpreter where the kernels
are concerned, AOT compiles for the table's targets instead of the device), so that the script
itself is tested without a GPU (tests/test_gpu_check.py runs `--dry-run --fast`). A step whose
time would run past `--budget` seconds is skipped with that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CALIB_SCHEME = "W4G64"  # sym 4-bit (vLLM's fast path) with a group that divides SmolLM2's 576 and 1536
# calibrate the first 4 of the bundled model's 30 blocks: enough to compare devices, and the CPU reference
# run stays within the time budget (a whole-model GPTQ on CPU takes minutes)
CALIB_BLOCKS = ["--skip", "lm_head", "--skip", r"layers\.([4-9]|[1-9][0-9])\."]
TARGETS = {  # (N, K) Llama-3-8B shapes and scheme -> batch-1 speedup over bf16 wanted (issue 4)
    ("W4G128", 4096, 14336): 3.0, ("W4G128", 28672, 4096): 3.0,
    ("W3G128", 4096, 14336): 3.8, ("W3G128", 28672, 4096): 3.8,
    ("W2G128", 4096, 14336): 5.0, ("W2G128", 28672, 4096): 5.0,
}


@dataclass
class Step:
    name: str
    what: str
    cmd: list[str]  # the GPU form
    dry: list[str] | None  # the CPU form for --dry-run (None: nothing to run without a GPU)
    timeout: int  # seconds (GPU form)
    fast: bool = False  # part of `--dry-run --fast` (the test)
    cuda: bool = True  # the GPU form needs a CUDA device
    needs: list[str] = field(default_factory=list)  # steps whose outputs it reads
    env: dict = field(default_factory=dict)


def steps(out: Path, venv_vllm: Path) -> list[Step]:
    o = str(out)
    q = [PY, "-m", "wq.quantize", "default", "--scheme", CALIB_SCHEME, "--no-progress", "--overwrite",
         "--nsamples", "16", "--seqlen", "256", *CALIB_BLOCKS]
    q_dry = [PY, "-m", "wq.quantize", "default", "--scheme", CALIB_SCHEME, "--no-progress", "--overwrite",
             "--nsamples", "2", "--seqlen", "32", *CALIB_BLOCKS]
    return [
        Step("aot_device", "Triton AOT compile of every config row for this GPU, against its own limits",
             [PY, "-m", "wq.kernels.triton_aot", "--device", "--json", f"{o}/aot_device.json", "--md",
              f"{o}/aot_device.md"],
             [PY, "-m", "wq.kernels.triton_aot", "--targets", "sm90", "--json", f"{o}/aot_device.json", "--md",
              f"{o}/aot_device.md"], 300, fast=True, env={"TRITON_INTERPRET": ""}),
        Step("gpu_tests", "kernel and op tests on the GPU (correctness matrix, CUDA graphs, determinism)",
             [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_triton_kernels.py",
              "tests/test_ops.py", "-m", "gpu or not gpu", "--junitxml", f"{o}/gpu_tests.xml"],
             None, 420),
        Step("bench_kernels", "packed matmul vs bf16 F.linear, Llama-3-8B shapes, M=1/16/64/256, every scheme, "
             "eager and CUDA graphs",
             [PY, "scripts/bench_kernels.py", "--ms", "1,16,64,256", "--iters", "30", "--repeats", "3",
              "--schemes", "W4G128,W3G128,W2G128,W4G-1,W8G-1,W4G128-asym", "-o", f"{o}/kernels"],
             [PY, "scripts/bench_kernels.py", "--device", "cpu", "--quick", "--ms", "1,16",
              "--schemes", "W4G128,W2G128", "-o", f"{o}/kernels"], 420, fast=True),
        Step("calib_gptq_cpu", "GPTQ on the bundled model (first 4 blocks), CPU: the reference for the CUDA run",
             q + ["--algo", "gptq", "--device", "cpu", "-o", f"{o}/ckpt/gptq_cpu"],
             q_dry + ["--algo", "gptq", "--device", "cpu", "-o", f"{o}/ckpt/gptq_cpu"], 300, cuda=False),
        Step("calib_gptq_cuda", "GPTQ on the bundled model (first 4 blocks), CUDA",
             q + ["--algo", "gptq", "--device", "cuda", "-o", f"{o}/ckpt/gptq_cuda"],
             q_dry + ["--algo", "gptq", "--device", "cpu", "-o", f"{o}/ckpt/gptq_cuda"], 300),
        Step("calib_gptq_compare", "GPTQ CUDA == CPU within tolerance (>= 99% codes equal, logits within 5%)",
             [PY, "scripts/calib_compare.py", f"{o}/ckpt/gptq_cpu", f"{o}/ckpt/gptq_cuda", "--json",
              f"{o}/calib_gptq.json"],
             [PY, "scripts/calib_compare.py", f"{o}/ckpt/gptq_cpu", f"{o}/ckpt/gptq_cuda", "--json",
              f"{o}/calib_gptq.json"], 180, needs=["calib_gptq_cpu", "calib_gptq_cuda"], cuda=False),
        Step("calib_autoround_cpu", "AutoRound (20 iterations) on the bundled model (first 4 blocks), CPU",
             q + ["--algo", "autoround", "--iters", "20", "--device", "cpu", "-o", f"{o}/ckpt/autoround_cpu"],
             None, 420, cuda=False),
        Step("calib_autoround_cuda", "AutoRound (20 iterations) on the bundled model (first 4 blocks), CUDA",
             q + ["--algo", "autoround", "--iters", "20", "--device", "cuda", "-o", f"{o}/ckpt/autoround_cuda"],
             None, 300),
        Step("calib_autoround_compare", "AutoRound CUDA == CPU within tolerance (>= 95% codes, logits within 5%)",
             [PY, "scripts/calib_compare.py", f"{o}/ckpt/autoround_cpu", f"{o}/ckpt/autoround_cuda",
              "--min-codes", "0.95", "--json", f"{o}/calib_autoround.json"], None, 180,
             needs=["calib_autoround_cpu", "calib_autoround_cuda"], cuda=False),
        Step("eval_cuda", "perplexity (Austen, seqlen 512, 40 windows) of the CUDA GPTQ checkpoint vs bf16, on CUDA",
             [PY, "-m", "eval.run", "--baseline", "default", "--quant", f"{o}/ckpt/gptq_cuda", "--device", "cuda",
              "--seqlen", "512", "--windows", "40", "-o", f"{o}/eval"],
             [PY, "-m", "eval.run", "--baseline", "default", "--quant", f"{o}/ckpt/gptq_cuda", "--device", "cpu",
              "--seqlen", "64", "--windows", "2", "-o", f"{o}/eval"], 300, needs=["calib_gptq_cuda"]),
        Step("bench_decode", "greedy decode tokens/s, Llama-3-8B-shaped (8 of 32 blocks), bf16 vs W4/W3/W2G128",
             [PY, "scripts/bench_decode.py", "--layers", "8", "--new-tokens", "64", "--repeats", "2",
              "--batches", "1,16", "-o", f"{o}/decode"],
             [PY, "scripts/bench_decode.py", "--device", "cpu", "--tiny", "--new-tokens", "4", "--repeats", "1",
              "--batches", "1", "--schemes", "BF16,W4G128", "-o", f"{o}/decode"], 420, fast=True),
        Step("vllm_smoke", "vLLM serves the CUDA GPTQ checkpoint and agrees with wq (separate venv)",
             [str(venv_vllm / "bin" / "python"), "scripts/vllm_smoke.py", f"{o}/ckpt/gptq_cuda"], None, 420,
             needs=["calib_gptq_cuda"]),
    ]


def device_info() -> dict:
    info = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                        memory_gib=round(p.total_memory / 2**30, 1), devices=torch.cuda.device_count())
    except Exception as e:  # the report must still be written
        info["torch_error"] = repr(e)
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:
        info["triton_error"] = repr(e)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except Exception:
        pass
    return info


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "device"


def headline(out: Path) -> dict:
    """The batch-1 targets from the kernel benchmark, when it ran on CUDA."""
    path = out / "kernels.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    got = {}
    for r in rows:
        key = (r["scheme"], r["N"], r["K"])
        if r["M"] == 1 and key in TARGETS:
            best = r.get("graph") or r["eager"]
            got[f"{r['scheme']} {r['N']}x{r['K']}"] = {"speedup": round(best["speedup"], 2), "target": TARGETS[key],
                                                       "met": best["speedup"] >= TARGETS[key]}
    slower = [f"{r['scheme']} {r['N']}x{r['K']} M={r['M']}" for r in rows
              if r["M"] <= 256 and (r.get("graph") or r["eager"])["speedup"] < 1.0]
    return {"batch1": got, "slower_than_bf16_up_to_m256": slower}


def wait_for_vllm(venv: Path, wait: float) -> str | None:
    """None once gpu_check.sh's background install has put vLLM into `venv`, else why not."""
    ok, why = Path(f"{venv}.ok"), Path(f"{venv}.reason")
    t_end = time.time() + max(0.0, wait)
    while not ok.exists() and not why.exists() and time.time() < t_end:
        time.sleep(5)
    if ok.exists():
        return None
    if why.exists():
        return why.read_text().strip()[:500]
    if (venv / "bin" / "python").exists() and Path(f"{venv}.log").exists():
        return "vLLM was still installing when the time budget ran out"
    return "vLLM is not installed (scripts/gpu_check.sh installs it into a venv in the background)"


def run_step(step: Step, dry: bool, out: Path, cuda: bool, status: dict, deadline: float) -> dict:
    cmd = step.dry if dry else step.cmd
    if cmd is None:
        return {"status": "skipped", "reason": "needs CUDA (no CPU form)" if dry else "no command"}
    if not dry and not cuda and step.cuda:
        return {"status": "skipped", "reason": "no CUDA device"}
    for dep in step.needs:
        if status.get(dep, {}).get("status") != "ok":
            return {"status": "skipped", "reason": f"needs {dep}, which did not succeed"}
    if step.name == "vllm_smoke" and not dry:
        reason = wait_for_vllm(Path(step.cmd[0]).parents[1], min(step.timeout, deadline - time.time() - 120))
        if reason:
            return {"status": "skipped", "reason": reason}
    left = deadline - time.time()
    timeout = step.timeout if not dry else max(60, step.timeout)
    if left < min(timeout, 60):
        return {"status": "skipped", "reason": f"time budget spent ({left:.0f} s left)"}
    timeout = int(min(timeout, left))
    log = out / "logs" / f"{step.name}.log"
    env = {**os.environ, **{k: v for k, v in step.env.items() if v}, "PYTHONUNBUFFERED": "1"}
    for k, v in step.env.items():
        if not v:
            env.pop(k, None)
    if dry:
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    res = {"status": "ok" if rc == 0 else ("timeout" if rc is None else "failed"), "seconds": round(time.time() - t0, 1),
           "command": shlex.join(cmd), "log": str(log.relative_to(out))}
    if rc not in (0, None):
        res["returncode"] = rc
    if rc != 0:
        res["tail"] = log.read_text(errors="replace")[-1500:]
    return res


def markdown(report: dict) -> str:
    info = report["device"]
    lines = [f"# gpu_check: {info.get('device', 'no GPU')}{' (dry run)' if report['dry_run'] else ''}", "",
             f"torch {info.get('torch')}, CUDA {info.get('cuda')}, triton {info.get('triton')}, "
             f"capability {info.get('capability', '-')}, {info.get('sms', '-')} SMs; "
             f"{report['started']}; {report['seconds']:.0f} s; command: `{report['command']}`", "",
             "| step | status | seconds | what |", "|---|---|---|---|"]
    for name, r in report["steps"].items():
        status = r["status"] + (f": {r['reason']}" if "reason" in r else "")
        lines.append(f"| {name} | {status} | {r.get('seconds', '')} | {report['what'][name]} |")
    head = report.get("headline") or {}
    if head.get("batch1"):
        lines += ["", "Batch-1 speedup over bf16 F.linear (CUDA graphs), against the targets:", "",
                  "| scheme, N x K | speedup | target | met |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['speedup']:.2f}x | {v['target']}x | {'yes' if v['met'] else 'no'} |"
                  for k, v in head["batch1"].items()]
        slower = head.get("slower_than_bf16_up_to_m256") or []
        lines += ["", f"Slower than bf16 at M <= 256: {', '.join(slower) if slower else 'none'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="run every step's CPU form (no GPU needed)")
    p.add_argument("--fast", action="store_true", help="with --dry-run: only the quick steps (the test)")
    p.add_argument("--out", default=None, help="output folder (default docs/gpu/<device>[-dry-run])")
    p.add_argument("--only", default=None, help="comma-separated step names")
    p.add_argument("--skip", default=None, help="comma-separated step names")
    p.add_argument("--budget", type=float, default=600, help="seconds for all steps together")
    p.add_argument("--vllm-venv", default=os.environ.get("WQ_VLLM_VENV", "/tmp/wq-vllm-venv"))
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    args = p.parse_args(argv)
    info = device_info()
    cuda = "device" in info
    out = Path(args.out or ROOT / "docs" / "gpu" / (slug(info.get("device", "cpu")) + ("-dry-run" if args.dry_run else "")))
    plan = steps(out.resolve(), Path(args.vllm_venv))
    if args.list:
        for s in plan:
            print(f"{s.name:24s} {'fast ' if s.fast else '     '}{s.what}")
        return 0
    names = [s.name for s in plan]
    for sel in (args.only, args.skip):
        unknown = set((sel or "").split(",")) - set(names) - {""}
        if unknown:
            p.error(f"unknown steps {sorted(unknown)}; steps: {', '.join(names)}")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    deadline = t0 + args.budget
    status: dict[str, dict] = {}
    for s in plan:
        if args.only and s.name not in args.only.split(","):
            status[s.name] = {"status": "skipped", "reason": "not in --only"}
        elif args.skip and s.name in args.skip.split(","):
            status[s.name] = {"status": "skipped", "reason": "--skip"}
        elif args.dry_run and args.fast and not s.fast:
            status[s.name] = {"status": "skipped", "reason": "not a --fast step"}
        else:
            status[s.name] = run_step(s, args.dry_run, out, cuda, status, deadline)
        r = status[s.name]
        note = f" ({r['reason']})" if "reason" in r else (f" in {r['seconds']:.0f} s" if "seconds" in r else "")
        print(f"[gpu_check] {s.name}: {r['status']}{note}", flush=True)
    report = {"device": info, "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": round(time.time() - t0, 1),
              "command": "scripts/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": status, "what": {s.name: s.what for s in plan},
              "headline": headline(out) if cuda and not args.dry_run else {}}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [n for n, r in status.items() if r["status"] in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
