"""One table for the bundled model: BF16, FP16, FP8, W8, W4G128 side by side (docs/fp16.md).

    python scripts/float_table.py [--windows 40] [--seqlen 512] [--audit-json OUT/fp16_audit.json] [-o JSON]

Per scheme: perplexity (CPU protocol: Pride and Prejudice, seqlen 512, 40 windows, fp32 math),
checkpoint size on disk, conversion time, and the largest activation against FP16's 65504 (measured
once on the BF16 model, 32 x 512 Emma tokens, fp32). Uses eval's perplexity when the eval package is
importable, else the same protocol written out below.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch


def perplexity(model, tok, text: str, seqlen: int, windows: int) -> float:
    """exp(mean NLL) over non-overlapping windows of the tokenized text, no BOS, fp32 (GPTQ protocol)."""
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = min(windows, ids.numel() // seqlen)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            x = ids[i * seqlen:(i + 1) * seqlen][None]
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            nll, count = nll + float(loss), count + seqlen - 1
    return float(torch.exp(torch.tensor(nll / count)))


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--schemes", nargs="+", default=["BF16", "FP16", "FP8", "W8", "W4G128"])
    p.add_argument("-o", "--output", default="docs/fp16_table.json")
    p.add_argument("--audit-json", help="fp16_audit.json of an FP16 run (skips the activation pass)")
    args = p.parse_args()
    torch.set_num_threads(2)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import wq
    from wq.assets import load_book, resolve_model
    from wq.cast import calib_ids

    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    text = load_book("prideprejudice")
    if not args.audit_json:
        audit = wq.cast.audit_fp16(copy.deepcopy(base), calib_ids(tok, load_book("emma"), 32, 512))
        mx, fp16_ok = {"name": audit.max_activation.name, "amax": audit.max_activation.amax}, audit.ok
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="wq-float-table-"))
    for s in args.schemes:
        m = copy.deepcopy(base)
        t = time.perf_counter()
        if wq.QuantScheme.parse(s).is_cast:
            m.to(torch.float16 if s == "FP16" else torch.bfloat16)
            m.wq_quant = {"scheme": s, "algo": "cast", "algo_args": {}, "layers": {}, "report": None}
        else:
            wq.quantize_model(m, s, progress=False)
        seconds = time.perf_counter() - t
        out = tmp / s
        wq.save(m, out)
        ppl = perplexity(m.float(), tok, text, args.seqlen, args.windows)
        rows.append({"scheme": s, "ppl": ppl, "bytes": dir_bytes(out), "convert_seconds": seconds,
                     "format": json.loads((out / "wq.json").read_text())["format"]})
        print(rows[-1], flush=True)
        del m
    if args.audit_json:  # reuse the audit that `python -m wq.quantize --scheme FP16` saved (read at the end)
        saved = json.loads(Path(args.audit_json).read_text())
        mx, fp16_ok = saved["max_activation"], saved["ok"]
    result = {"protocol": f"Pride and Prejudice, seqlen {args.seqlen}, {args.windows} windows, fp32 math, no BOS",
              "max_activation": {"name": mx["name"], "amax": mx["amax"], "fp16_max": 65504.0},
              "fp16_ok": fp16_ok, "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
