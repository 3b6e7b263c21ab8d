"""One table for the bundled model: BF16, FP16, FP8, W8, W4G128 side by side (docs/fp16.md).

    python scripts/float_table.py [--windows 40] [--seqlen 512] [--threads 1] [-o docs/fp16_table.json]

Per scheme: perplexity from eval.ppl (DESIGN.md CPU protocol: Pride and Prejudice, seqlen 512, first
40 windows, fp32 math), checkpoint size on disk and the format written (wq.save's default for the
scheme), conversion time (cast or wq.quantize_model, RTN), and the largest activation of that model
during its own perplexity pass. Above the rows: the FP16 audit of the BF16 model (wq.cast.audit_fp16,
32 x 512 Emma tokens, fp32), its largest activation against FP16's 65504.

Math: each checkpoint is reloaded from disk with wq.load(dtype=float32): cast models (BF16, FP16) are
upcast to fp32 (exact); quantized models keep their QuantLinear layers and run the reference kernel
(pinned below), which dequantizes to fp32. So FP16's perplexity is that of the FP16 *weights*; FP16 *activations*
are the audit's question.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # wq and eval from this checkout

# the CPU protocol is fp32: pin the reference kernel (the fast CPU kernels run bf16 activations)
os.environ["WQ_KERNEL"] = "reference"

import torch  # noqa: E402
from torch import nn  # noqa: E402

FP16_MAX = 65504.0


def dir_bytes(d: Path) -> int:
    """Bytes of the weight files (safetensors) under d."""
    return sum(f.stat().st_size for f in d.rglob("*.safetensors"))


@contextmanager
def max_activation(model: nn.Module):
    """Track the largest |x| at Linear / QuantLinear outputs, norm inputs (the residual stream) and
    decoder-block outputs while the block runs; yields a dict filled with {"name", "amax"}."""
    from wq.fp16_audit import _blocks, _first_tensor
    from wq.nn.quant_linear import QuantLinear

    best = {"name": None, "amax": 0.0}
    blocks = _blocks(model)

    def hook(name: str, use_input: bool):
        def fn(mod, inputs, output) -> None:
            t = _first_tensor(inputs if use_input else output)
            if t is not None and t.is_floating_point() and t.numel():
                a = float(t.detach().abs().amax())
                if a > best["amax"]:
                    best.update(name=name + (":in" if use_input else ":out"), amax=a)
        return fn

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, QuantLinear)) or name in blocks:
            handles.append(m.register_forward_hook(hook(name, False)))
        elif "norm" in type(m).__name__.lower():
            handles.append(m.register_forward_hook(hook(name, True)))
    try:
        yield best
    finally:
        for h in handles:
            h.remove()


def markdown(result: dict) -> str:
    """The table of docs/fp16.md from a result dict (the JSON this script writes)."""
    a = result["fp16_audit"]
    base = next((r for r in result["rows"] if r["scheme"] == "BF16"), result["rows"][0])
    lines = ["| scheme | format | ppl | vs BF16 | checkpoint MB | convert s | max activation (own ppl pass) | vs 65504 |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in result["rows"]:
        act = r["max_activation"]
        lines.append(f"| {r['scheme']} ({r['algo']}) | {r['format']} | {r['ppl']:.4f} | "
                     f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {r['bytes'] / 1e6:.1f} | "
                     f"{r['convert_seconds']:.2f} | {act['name']} {act['amax']:,.0f} | {act['ratio_to_fp16_max']:.1%} |")
    lines.append("")
    lines.append(f"FP16 audit of the BF16 model ({a['calib']}): largest activation {a['name']} = {a['amax']:,.1f}, "
                 f"{a['ratio_to_fp16_max']:.1%} of 65504 ({1 / a['ratio_to_fp16_max']:.2f}x headroom): "
                 f"FP16 {'safe' if a['fp16_ok'] else 'NOT safe'}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--schemes", nargs="+", default=["BF16", "FP16", "FP8", "W8", "W4G128"])
    p.add_argument("--calib-samples", type=int, default=32, help="Emma windows of 512 for the FP16 audit")
    p.add_argument("--render", metavar="JSON", help="only print the markdown table of a saved result")
    p.add_argument("-o", "--output", default="docs/fp16_table.json")
    args = p.parse_args()
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import wq
    from eval.ppl import load_ppl_data, perplexity
    from wq.assets import load_book, resolve_model
    from wq.cast import calib_ids

    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    data = load_ppl_data("prideprejudice", tok, args.seqlen, args.windows)

    t = time.perf_counter()
    audit = wq.cast.audit_fp16(copy.deepcopy(base), calib_ids(tok, load_book("emma"), args.calib_samples, 512))
    mx = audit.max_activation
    audit_row = {"name": mx.name, "amax": mx.amax, "ratio_to_fp16_max": mx.amax / FP16_MAX, "fp16_ok": audit.ok,
                 "calib": f"Emma, {args.calib_samples} x 512 tokens, BF16 model upcast to fp32", "seconds": time.perf_counter() - t}
    print("audit", audit_row, flush=True)

    rows, tmp = [], Path(tempfile.mkdtemp(prefix="wq-float-table-"))
    for s in args.schemes:
        m = copy.deepcopy(base)
        t = time.perf_counter()
        if wq.QuantScheme.parse(s).is_cast:
            m.to(torch.float16 if s == "FP16" else torch.bfloat16)
            m.wq_quant = {"scheme": s, "algo": "cast", "algo_args": {}, "layers": {}, "report": None}
            algo = "cast"
        else:
            wq.quantize_model(m, s, progress=False)
            algo = "rtn"
        seconds = time.perf_counter() - t
        out = tmp / s
        t = time.perf_counter()
        wq.save(m, out)
        save_seconds = time.perf_counter() - t
        # evaluate the checkpoint as written, reloaded with fp32 for everything unquantized (exact for
        # BF16/FP16 values). Not the in-memory model: model.to(float16) also rounds RoPE's inv_freq
        # buffer to fp16, which a loaded checkpoint recomputes in fp32.
        del m
        m = wq.load(out, dtype=torch.float32)
        t = time.perf_counter()
        with max_activation(m) as act:
            r = perplexity(m, data, progress=False)
        rows.append({"scheme": s, "algo": algo, "ppl": r["ppl"], "bytes": dir_bytes(out),
                     "format": json.loads((out / "wq.json").read_text())["format"],
                     "convert_seconds": seconds, "save_seconds": save_seconds,
                     "ppl_seconds": time.perf_counter() - t,
                     "max_activation": {**act, "ratio_to_fp16_max": act["amax"] / FP16_MAX}})
        print(rows[-1], flush=True)
        del m
    result = {"model": Path(path).name, "protocol": r["protocol"] + "; fp32 math, reference kernel for quantized layers",
              "threads": args.threads, "fp16_max": FP16_MAX, "fp16_audit": audit_row, "rows": rows,
              "total_seconds": time.perf_counter() - t_all}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
