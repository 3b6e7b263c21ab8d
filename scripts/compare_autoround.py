"""wq's autoround side by side with the `auto-round` package (and wq's rtn / gptq) on the same model.

Same model (fp32 copy of the bundled SmolLM2 unless --model), same calibration token windows (drawn
once by wq.calib from Emma and handed to both as token tensors), same seqlen, nsamples, batch size,
iterations and seed; lm_head left unquantized by both. Quantization wall time is measured in this one
process, the tools interleaved per scheme; perplexity with the DESIGN.md CPU protocol
(scripts/ppl_quick.py: Pride and Prejudice, seqlen 512, first 40 windows, fp32).

    python scripts/compare_autoround.py --schemes W4G128 W3G128 W2G128 --iters 200 \\
        --algos rtn gptq autoround auto-round --baseline -o docs/results/compare_autoround.json

auto-round settings used: scheme "W<b>A16", group_size, sym as wq's scheme, dataset = list of
[1, seqlen] token tensors, device_map="cpu", enable_torch_compile=False, everything else default
(signed gradient with lr 1/iters, min/max range tuning, quantized block inputs).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from ppl_quick import load_fp32, perplexity, windows_for  # noqa: E402

from wq import quantize_model  # noqa: E402
from wq.calib.data import calibration_samples  # noqa: E402
from wq.scheme import QuantScheme  # noqa: E402

log = logging.getLogger("compare_autoround")


def run_wq(model, scheme: QuantScheme, algo: str, samples: torch.Tensor, tok, a) -> None:
    extra = {k: _value(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    if algo == "rtn":
        quantize_model(model, scheme, algo="rtn", progress=False, **extra)
        return
    args = {"nsamples": samples.shape[0], "seqlen": samples.shape[1], "batch_size": a.batch_size, "seed": a.seed}
    if algo in ("autoround", "recon"):
        args["iters"] = a.iters
        if a.lr is not None:
            args["lr"] = a.lr
    quantize_model(model, scheme, algo=algo, calib=samples, tokenizer=tok, progress=False, **{**args, **extra})


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def dequantized_copy_(model) -> None:
    """QuantLinear -> nn.Linear holding dequantize(packed) in fp32: the reference kernel's exact math
    (unpack, dequantize, F.linear) without unpacking on every forward, so evaluation stays fast."""
    from torch import nn

    from wq.nn import QuantLinear, set_module

    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.packed.dequantize(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.float()
            set_module(model, name, lin)


def run_auto_round(model, scheme: QuantScheme, samples: torch.Tensor, tok, a) -> None:
    from auto_round import AutoRound

    ar = AutoRound(
        model, tok, scheme=f"W{scheme.bits}A16", group_size=scheme.group_size, sym=scheme.sym,
        dataset=[samples[i : i + 1] for i in range(samples.shape[0])], iters=a.iters, seqlen=samples.shape[1],
        nsamples=samples.shape[0], batch_size=a.batch_size, seed=a.seed, device_map="cpu",
        enable_torch_compile=False, **({} if a.lr is None else {"lr": a.lr, "minmax_lr": a.lr}),
    )
    ar.quantize()  # on CPU the model's Linear weights are replaced by their fake-quantized values in place
    if ar.model is not model:
        model.load_state_dict(ar.model.state_dict())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--schemes", nargs="+", default=["W4G128", "W3G128", "W2G128"])
    ap.add_argument("--algos", nargs="+", default=["rtn", "gptq", "autoround", "auto-round"])
    ap.add_argument("--baseline", action="store_true", help="also measure the unquantized model's perplexity")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="signed-gradient step for both tools (default 1/iters)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--blocks", type=int, default=None,
                    help="keep only the first N decoder blocks: for timing the tools side by side (no perplexity)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more wq settings (e.g. rotate=true init=gptq quantizer=gptq), not given to auto-round")
    ap.add_argument("-o", "--output", default=None, help="JSON file for the results")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("auto_round", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)

    base, tok = load_fp32(a.model)
    if a.blocks:
        base.model.layers = base.model.layers[: a.blocks]
        base.config.num_hidden_layers = a.blocks
    samples = calibration_samples("emma", tok, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed)  # [n, L]
    windows = windows_for(tok, "prideprejudice", a.eval_seqlen, a.windows)
    rows = []
    meta = {"iters": a.iters, "lr": a.lr or f"1/{a.iters}", "nsamples": a.nsamples, "seqlen": a.seqlen, "batch_size": a.batch_size,
            "seed": a.seed, "eval": f"prideprejudice seqlen {a.eval_seqlen} x {windows.shape[0]} windows fp32",
            "threads": torch.get_num_threads(), "command": "python " + " ".join(sys.argv), "set": a.set,
            "load_average_at_start": os.getloadavg(), "blocks": a.blocks or base.config.num_hidden_layers}
    for s in a.schemes:
        scheme = QuantScheme.parse(s)
        for algo in a.algos:
            model = copy.deepcopy(base)
            load0 = os.getloadavg()
            t, cpu = time.perf_counter(), time.process_time()
            if algo == "auto-round":
                run_auto_round(model, scheme, samples, tok, a)
            else:
                run_wq(model, scheme, algo, samples, tok, a)
            seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
            dequantized_copy_(model)
            r = {"ppl": float("nan")} if a.blocks else perplexity(model.eval(), windows)
            rows.append({"scheme": str(scheme), "algo": algo, "ppl": r["ppl"], "seconds": seconds,
                         "cpu_seconds": cpu_seconds, "load_avg_start": load0, "load_avg_end": os.getloadavg()})
            log.info("%s %s: ppl %.3f, quantization %.1fs (cpu %.1fs)", scheme, algo, r["ppl"], seconds, cpu_seconds)
            del model
            if a.output:
                _write(a.output, meta, rows)
    if a.baseline and not a.blocks:
        r = perplexity(base, windows)
        rows.append({"scheme": "BF16", "algo": "-", "ppl": r["ppl"], "seconds": 0.0})
        log.info("baseline ppl %.3f", r["ppl"])
        if a.output:
            _write(a.output, meta, rows)
    print(f"\n{meta['eval']}; calibration {a.nsamples} x {a.seqlen} Emma, iters {a.iters}, batch {a.batch_size}")
    print("| scheme | algo | ppl | quantize s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['algo']} | {r['ppl']:.3f} | {r['seconds']:.1f} |")


def _write(path: str, meta: dict, rows: list) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
