"""Where eval's time goes, and what shared-context scoring saves: the Austen tasks on the bundled model, scored
by lm-eval's own HFLM path and by eval.loglik's packed path, alternated in one process (same load).

    python scripts/bench_eval.py --limit 100 --reps 1 --json docs/bench/eval_tasks.json

Prints per path: seconds, requests, tokens through the model; and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]  # this checkout's wq and eval
import wq  # noqa: E402, F401  (OMP_WAIT_POLICY before torch)


def main() -> None:
    p = argparse.ArgumentParser(prog="python scripts/bench_eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=100, help="docs per task")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval import tasks
    from wq.assets import resolve_model
    from wq.threads import describe

    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = {"n": 0}
    forward = model.forward

    def counting(*a, **kw):
        ids = kw.get("input_ids") if "input_ids" in kw else a[0]
        tokens["n"] += int(ids.numel())
        return forward(*a, **kw)

    model.forward = counting
    made = tasks._make_lm

    rows = []
    load0 = os.getloadavg()[0]
    for rep in range(args.reps):
        for shared in (False, True):
            tasks._make_lm = lambda *a, shared=shared, **kw: made(*a, shared_contexts=shared, **kw)
            tokens["n"] = 0
            t = time.perf_counter()
            res = tasks.run_tasks(model, tok, ["austen"], limit=args.limit, bootstrap_iters=0)
            dt = time.perf_counter() - t
            accs = {k: round(v.get("acc", float("nan")), 4) for k, v in res["tasks"].items()}
            row = {"path": "shared contexts (eval.loglik)" if shared else "lm-eval HFLM", "rep": rep,
                   "seconds": round(dt, 1), "tokens": tokens["n"], "acc": accs, "load": round(os.getloadavg()[0], 2)}
            rows.append(row)
            print(row, flush=True)
    tasks._make_lm = made
    out = {"command": f"python scripts/bench_eval.py --limit {args.limit} --reps {args.reps}", "runtime": describe(),
           "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2), "rows": rows}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
