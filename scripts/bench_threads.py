"""OpenMP wait policy and thread count on a shared CPU: RTN of the bundled model, and greedy decode of the dense
model next to its W4G128 checkpoint, one fresh process per setting (the policy is read when torch loads).

    python scripts/bench_threads.py --json docs/bench/threads.json

Settings: OMP_WAIT_POLICY unset (GNU OpenMP spins before sleeping) or PASSIVE (sleeps at once), 1 or 2 threads.
Each row records the 1-minute load average before and after it: on a machine shared with other processes the
numbers move with it, so compare rows of one run (they alternate), not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[3]))
from transformers import AutoModelForCausalLM
import wq
from wq.assets import resolve_model
from wq.io import load
path = resolve_model(None)
out = {}
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
t = time.perf_counter(); wq.quantize_model(m, "W4G128", progress=False); out["rtn_s"] = time.perf_counter() - t
dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
quant = load(sys.argv[2], dtype=torch.float32, compact=True)
ids = torch.tensor([[1, 504, 3100, 314, 253, 8087]])
def tps(model, n=24):
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return n / (time.perf_counter() - t)
with torch.no_grad():
    out["dense_tps"], out["quant_tps"] = tps(dense), tps(quant)
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(prog="python scripts/bench_threads.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ckpt = Path(tempfile.mkdtemp(prefix="wq-threads-")) / "w4"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    subprocess.run([sys.executable, "-m", "wq.quantize", "--scheme", "W4G128", "-o", str(ckpt), "--no-progress"],
                   cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    rows = []
    for rep in range(args.reps):
        for policy in (None, "PASSIVE"):
            for threads in (2, 1):
                e = dict(env)
                if policy:
                    e["OMP_WAIT_POLICY"] = policy
                else:
                    e["GOMP_SPINCOUNT"] = "300000"  # GNU OpenMP's own default, stated so wq leaves it alone
                before = os.getloadavg()[0]
                r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(ckpt), str(threads)], env=e,
                                   capture_output=True, text=True)
                line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
                res = json.loads(line[7:]) if line else {"error": r.stderr[-500:]}
                row = {"policy": policy or "default (spin 300000)", "threads": threads, "rep": rep,
                       **{k: round(v, 2) for k, v in res.items() if isinstance(v, float)},
                       "load_before": round(before, 2), "load_after": round(os.getloadavg()[0], 2)}
                if "error" in res:
                    row["error"] = res["error"]
                rows.append(row)
                print(row, flush=True)
    out = {"command": f"python scripts/bench_threads.py --reps {args.reps}", "cpus": os.cpu_count(), "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
