"""Compiled resource use of the Triton kernels, today's against an older revision's, per GPU target.

    python scripts/triton_resources.py                       # old = 42a97b0 (the kernels before issue 19)
    python scripts/triton_resources.py --old REF --targets sm90,sm80 -o docs/bench/triton_resources

Compiles (no GPU needed, Triton's own compiler) the kernels each revision would launch for the same
layer (N = K = 4096) and the same weights: the `hot` variant (symmetric, group 128, bf16) and the
`full` one (asymmetric, group 32, act-order g_idx, bias, fp16), per path and bit width, and writes
registers, shared memory, local-memory (spill) instructions and the blocks per SM those allow
(predicted occupancy, not a measurement) as JSON + markdown. The old revision's kernel files are
read with `git show` into a scratch package; its launch parameters are the ones its launchers used
(written out below, since the old code had no plan functions).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from wq.kernels import triton_aot  # noqa: E402
from wq.kernels.triton_configs import CONFIGS, TARGETS  # noqa: E402
from wq.kernels.triton_launch import Launch  # noqa: E402

OLD_REF = "42a97b0"
OLD_FILES = ["wq/kernels/triton_matmul.py", "wq/kernels/triton_dequant.py", "wq/kernels/triton_layout.py",
             "wq/packing.py", "wq/primitives.py", "wq/scheme.py"]
N = K = 4096


def import_old(ref: str, tmp: Path):
    """The old revision's triton modules as the package `wqold` (no wq/__init__: nothing registers twice)."""
    pkg = tmp / "wqold"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels" / "__init__.py").write_text("")
    for f in OLD_FILES:
        src = subprocess.run(["git", "show", f"{ref}:{f}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        (pkg / f.removeprefix("wq/")).write_text(src)
    sys.path.insert(0, str(tmp))
    import wqold.kernels.triton_dequant as dq
    import wqold.kernels.triton_matmul as mm

    return mm, dq


def old_launches(mm, dq, path: str, bits: int, variant: str) -> Launch:
    """What the old launchers launched for a 4096 x 4096 layer (their fixed block sizes, split-K GEMV)."""
    import triton.language as tl

    v = triton_aot.VARIANTS[variant]
    g = v.group
    const_zero = 2 ** (bits - 1) if v.sym else -1
    x_dt = v.dtype
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[x_dt]
    ptrs = {"qw_ptr": torch.int32, "qh_ptr": torch.int32 if bits == 3 else None, "s_ptr": torch.float16,
            "z_ptr": torch.uint8, "gi_ptr": torch.int32 if v.act_order else None}
    if path == "dequant":
        bk, bn = 64, 128
        mode = 2 if v.act_order else (0 if g % bk == 0 else 1)
        return Launch(dq._dequant_kernel, (K // bk, N // bn), 4, 3, {"w_ptr": x_dt, **ptrs},
                      {"K": K, "N": N, "n_groups": K // g},
                      dict(G=g, BITS=bits, CONST_ZERO=const_zero, MODE=mode, BLOCK_K=bk, BLOCK_N=bn))
    if path == "gemv":
        bm, bn, bk, warps, stages, split, m = 16, 64, 128, 4, 4, 4, 1
    elif path == "gemm_s":
        bm, bn, bk, warps, stages, split, m = 64, 64, 64, 4, 4, 1, 64
    else:
        bm, bn, bk, warps, stages, split, m = 128, 128, 64, 8, 3, 1, 1024
    mode = 2 if v.act_order else (0 if g % bk == 0 else 1)
    return Launch(mm._matmul_kernel, (1, split), warps, stages,
                  {"x_ptr": x_dt, "y_ptr": torch.float32 if split > 1 else x_dt,
                   "b_ptr": x_dt if v.bias and split == 1 else None, **ptrs},
                  {"M": m, "N": N, "K": K, "n_groups": K // g, "k_per_split": K // split},
                  dict(G=g, BITS=bits, CONST_ZERO=const_zero, MODE=mode, DOT_DTYPE=dot, SPLIT_K=split, GROUP_M=8,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk))


def summary(res: dict, target) -> dict:
    if "error" in res:
        return {"error": res["error"].splitlines()[0]}
    return {"regs": res["registers"], "shared": res["shared"], "spill_ops": res["spill_stores"] + res["spill_loads"],
            "blocks_per_sm": res["blocks_per_sm"], "fits": res["shared"] <= target.smem_per_block}


def cell(s: dict) -> str:
    if "error" in s:
        return "compile error"
    fit = "" if s["fits"] else " **over limit**"
    spill = f", {s['spill_ops']} spill ops" if s["spill_ops"] else ""
    return f"{s['regs']} regs, {s['shared'] / 1024:.1f} KiB{fit}{spill}, {s['blocks_per_sm']} blk/SM"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", default=OLD_REF, help="git revision of the kernels to compare with")
    p.add_argument("--targets", default="sm80,sm86,sm89,sm90")
    p.add_argument("--variants", default="hot,full")
    p.add_argument("-o", "--out", default="docs/bench/triton_resources")
    args = p.parse_args(argv)
    import triton

    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mm, dq = import_old(args.old, Path(tmp))
        for tname in args.targets.split(","):
            t = TARGETS[tname]
            for path in ("gemv", "gemm_s", "gemm_l", "dequant"):
                for bits in (2, 3, 4, 8):
                    cfg = CONFIGS[t.family, path, bits]
                    for variant in args.variants.split(","):
                        m = {"gemv": 1, "gemm_s": 64, "gemm_l": 1024, "dequant": 1}[path]
                        old = triton_aot.compile_launch(old_launches(mm, dq, path, bits, variant), t)
                        new_launch = triton_aot.plan(path, bits, cfg, triton_aot.VARIANTS[variant], m, t.sms)
                        new = triton_aot.compile_launch(new_launch, t)
                        rows.append({"target": tname, "path": path, "bits": bits, "variant": variant, "M": m,
                                     "old": summary(old, t), "new": summary(new, t)})
                        print(tname, path, bits, variant, "old:", cell(rows[-1]["old"]), "| new:", cell(rows[-1]["new"]),
                              flush=True)
    meta = {"triton": triton.__version__, "old_ref": args.old, "layer": f"N=K={N}",
            "command": "python scripts/triton_resources.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(time.time() - t0)}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Triton {meta['triton']}; old = {args.old}; layer {meta['layer']}; command: `{meta['command']}`. "
             "blk/SM = resident blocks per SM allowed by registers and shared memory (predicted).", "",
             "| target | path | bits | variant | old kernels | new kernels |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['path']} | {r['bits']} | {r['variant']} M={r['M']} | {cell(r['old'])} | "
                     f"{cell(r['new'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json/.md in {meta['seconds']} s")


if __name__ == "__main__":
    main()
