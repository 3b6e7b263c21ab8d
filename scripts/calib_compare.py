"""Two checkpoints of the same model and recipe (say calibrated on CPU and on CUDA): are they the same?

    python scripts/calib_compare.py REF_DIR OTHER_DIR [--min-codes 0.99] [--max-logit-rel 0.05] [--json OUT]

Loads both with wq.load on the CPU and compares, layer by layer, the integer codes (fraction equal),
the scales (median and max relative difference) and the zero points, then the logits of both models
on a fixed Austen passage (fp32, reference kernel): relative L2 distance and top-1 agreement.
Calibration on another device sums in another order, so GPTQ may flip a code that sits on a rounding
boundary and AutoRound's sign-gradient steps may diverge a little: the tolerances are the flags.
Exit 1 when a tolerance is exceeded. scripts/gpu_check.sh runs it for gptq and autoround.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("WQ_KERNEL", "reference")

import torch  # noqa: E402


def packed_layers(model) -> dict:
    from wq.nn.quant_linear import QuantLinear

    return {n: m.packed for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def compare(ref_dir: str, other_dir: str, text_tokens: int = 256) -> dict:
    import wq
    from wq.assets import load_book

    ref, other = wq.load(ref_dir, device="cpu", dtype=torch.float32), wq.load(other_dir, device="cpu",
                                                                              dtype=torch.float32)
    a, b = packed_layers(ref), packed_layers(other)
    if set(a) != set(b):
        raise SystemExit(f"the checkpoints quantize different layers: {sorted(set(a) ^ set(b))[:5]}")
    equal = total = 0
    scale_rel, zeros_equal, zeros_total, per_layer = [], 0, 0, {}
    for name in a:
        ca, cb = a[name].codes(), b[name].codes()
        e = int((ca == cb).sum())
        equal, total = equal + e, total + ca.numel()
        rel = ((a[name].scales.float() - b[name].scales.float()).abs() / a[name].scales.float().abs().clamp_min(1e-12))
        scale_rel.append(rel.flatten())
        zeros_equal += int((a[name].zeros == b[name].zeros).sum())
        zeros_total += a[name].zeros.numel()
        per_layer[name] = e / ca.numel()
    rel = torch.cat(scale_rel)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref_dir)
    text = "\n".join(load_book("emma")[200:400])
    ids = tok(text, return_tensors="pt").input_ids[:, :text_tokens]
    with torch.no_grad():
        la, lb = ref(ids).logits.float(), other(ids).logits.float()
    worst = sorted(per_layer.items(), key=lambda kv: kv[1])[:3]
    return {"layers": len(a), "codes_equal": equal / total, "zeros_equal": zeros_equal / zeros_total,
            "scale_rel_median": rel.median().item(), "scale_rel_max": rel.max().item(),
            "logits_rel_l2": ((la - lb).norm() / la.norm()).item(),
            "top1_agree": (la.argmax(-1) == lb.argmax(-1)).float().mean().item(), "tokens": ids.shape[1],
            "worst_layers": {n: round(v, 5) for n, v in worst}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref")
    p.add_argument("other")
    p.add_argument("--min-codes", type=float, default=0.99, help="least fraction of equal codes")
    p.add_argument("--max-logit-rel", type=float, default=0.05, help="largest relative L2 distance of the logits")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = compare(args.ref, args.other)
    res["tolerance"] = {"min_codes": args.min_codes, "max_logit_rel": args.max_logit_rel}
    res["ok"] = res["codes_equal"] >= args.min_codes and res["logits_rel_l2"] <= args.max_logit_rel
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
