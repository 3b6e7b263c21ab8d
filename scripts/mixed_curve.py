"""Perplexity vs average bits per quantized weight: `--bits-budget` against the uniform schemes.

Every point is one quantization of a fresh fp32 copy of the model with the same algorithm (`--algo`):
the uniform schemes (every layer at one scheme) and the budget search (`quantize_model(bits_budget=B)`,
each layer's scheme chosen among `--candidates` by wq.budget's Fisher estimate). Bits per weight are
counted as wq.budget counts them: every tensor the budget's format (compressed-tensors) writes for a
quantized layer (packed codes, scales, zero points; not the bias), summed over the quantized layers and
divided by their weights; lm_head stays unquantized in both. Perplexity with the DESIGN.md CPU
protocol (scripts/ppl_quick.py: Pride and Prejudice, seqlen 512, first 40 windows, fp32); calibration
(the budget's sensitivities, and the algorithm when it takes data) from Emma, seed 0.

The Fisher information depends only on the unquantized model and the calibration samples, so it is
measured once and reused by every budget of one run (`--no-fisher-cache` measures it per budget).

    python scripts/mixed_curve.py --algo rtn -o docs/results/mixed_curve_rtn.json --plot docs/mixed_curve.png
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
from compare_autoround import _value, _write, dequantized_copy_  # noqa: E402
from ppl_quick import load_fp32, perplexity, windows_for  # noqa: E402

import wq.budget as B  # noqa: E402
from wq import quantize_model  # noqa: E402
from wq.calib.data import calibration_samples  # noqa: E402

log = logging.getLogger("mixed_curve")

UNIFORM = ["W2G128", "W2G64", "W3G128", "W3G64", "W4G128", "W4G64"]
BUDGETS = [2.25, 2.5, 3.0, 3.25, 3.5, 4.25, 4.5]


def cache_fisher() -> None:
    """Memoize wq.budget.fisher_diagonal on (layer names, sample ids): same inputs, same result."""
    real, memo = B.fisher_diagonal, {}

    def cached(model, names, samples):
        key = (tuple(names), samples.shape, hash(samples.numpy().tobytes()))
        if key not in memo:
            memo[key] = real(model, names, samples)
        return memo[key]  # read only downstream (predicted_costs)

    B.fisher_diagonal = cached


def written_bits(layers: dict[str, str], model) -> tuple[float, dict[str, int]]:
    """(bits per quantized weight, {scheme: weights}) of a plan {layer: scheme} on the unquantized `model`,
    as wq.budget counts them."""
    from wq.transforms.weights import linear_weight

    bits = numel = 0
    share: dict[str, int] = {}
    for n, s in layers.items():
        o, i = linear_weight(model.get_submodule(n)).shape
        bits += B.layer_bits(s, o, i, B.DEFAULT_FORMAT)
        numel += o * i
        share[s] = share.get(s, 0) + o * i
    return bits / numel, share


def plot(rows: list[dict], path: str, title: str) -> None:
    """Left: the whole range (log ppl); right: 3 bits and up, where the usable points are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    base = [r for r in rows if r["kind"] == "baseline"]
    algos = sorted({r["algo"] for r in rows if r["kind"] != "baseline"})
    for ax in axes:
        for algo, color in zip(algos, ("tab:blue", "tab:red", "tab:green", "tab:purple")):
            uni = sorted((r for r in rows if r["algo"] == algo and r["kind"] == "uniform"), key=lambda r: r["bits"])
            mix = sorted((r for r in rows if r["algo"] == algo and r["kind"] == "budget"), key=lambda r: r["bits"])
            if mix:
                ax.plot([r["bits"] for r in mix], [r["ppl"] for r in mix], "o-", color=color, ms=4,
                        label=f"--bits-budget ({algo})")
            if uni:
                ax.plot([r["bits"] for r in uni], [r["ppl"] for r in uni], "s", color=color, mfc="none", ms=8,
                        label=f"uniform ({algo})")
                for r in uni:
                    ax.annotate(r["scheme"], (r["bits"], r["ppl"]), textcoords="offset points", xytext=(5, 3),
                                fontsize=7, color=color)
        if base:
            ax.axhline(base[0]["ppl"], color="gray", ls="--", lw=0.8, label=f"unquantized ({base[0]['ppl']:.2f})")
        ax.set_xlabel("bits per quantized weight (codes + scales + zeros, compressed-tensors)")
        ax.grid(True, which="both", lw=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("perplexity (P&P, 512 x 40)")
    axes[0].set_title(title, fontsize=9)
    axes[1].set_xlim(3.0, 4.6)
    axes[1].set_ylim(25, 120)
    axes[1].set_title("3 bits and up (linear scale)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--algo", default="rtn")
    ap.add_argument("--uniform", nargs="*", default=UNIFORM)
    ap.add_argument("--budgets", nargs="*", type=float, default=BUDGETS)
    ap.add_argument("--candidates", nargs="+", default=list(B.DEFAULT_CANDIDATES))
    ap.add_argument("--budget-samples", type=int, default=16, help="calibration samples of the Fisher estimate")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--baseline", action="store_true", help="also measure the unquantized model")
    ap.add_argument("--no-fisher-cache", action="store_true")
    ap.add_argument("--interleave", action="store_true",
                    help="with as many --budgets as --uniform: run them in pairs (uniform 1, budget 1, ...)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more settings for the algorithm")
    ap.add_argument("-o", "--output", default=None, help="JSON file, rewritten after every point")
    ap.add_argument("--plot", default=None, help="PNG written at the end (and from --output's rows)")
    ap.add_argument("--plot-from", nargs="*", default=[], help="only plot: JSON files of earlier runs")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    if a.plot_from:
        rows = [r for f in a.plot_from for r in json.loads(Path(f).read_text())["rows"]]
        plot(rows, a.plot, "SmolLM2-135M (bundled), CPU protocol")
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.no_fisher_cache:
        cache_fisher()

    base, tok = load_fp32(a.model)
    samples = calibration_samples("emma", tok, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed)  # [n, L]
    windows = windows_for(tok, "prideprejudice", 512, a.windows)
    extra = {k: _value(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    args = {"nsamples": samples.shape[0], "seqlen": samples.shape[1], "batch_size": a.batch_size, "seed": a.seed,
            **extra}
    meta = {"algo": a.algo, "settings": args, "candidates": a.candidates, "budget_samples": a.budget_samples,
            "calibration": f"emma {a.nsamples} x {a.seqlen} seed {a.seed}",
            "eval": f"prideprejudice seqlen 512 x {windows.shape[0]} windows fp32", "threads": torch.get_num_threads(),
            "fisher_cached": not a.no_fisher_cache, "command": "python " + " ".join(sys.argv),
            "load_average_at_start": os.getloadavg()}
    rows: list[dict] = []
    if a.baseline:
        r = perplexity(base, windows)
        rows.append({"kind": "baseline", "algo": "-", "scheme": "BF16", "bits": None, "ppl": r["ppl"]})
        log.info("baseline ppl %.3f", r["ppl"])
    uniform, budgets = [("uniform", s) for s in a.uniform], [("budget", b) for b in a.budgets]
    points = uniform + budgets
    if a.interleave:  # uniform 1, budget 1, uniform 2, ...: a run cut short still leaves matched pairs
        if len(uniform) != len(budgets):
            ap.error("--interleave needs as many --budgets as --uniform schemes")
        points = [p for pair in zip(uniform, budgets) for p in pair]
    for kind, what in points:
        model = copy.deepcopy(base)
        load0 = os.getloadavg()
        t, cpu = time.perf_counter(), time.process_time()
        if kind == "uniform":
            quantize_model(model, what, algo=a.algo, calib=samples, tokenizer=tok, progress=False, **args)
        else:  # `scheme` only names the report's default; the budget chooses every layer's
            quantize_model(model, a.candidates[0], algo=a.algo, calib=samples, tokenizer=tok, progress=False,
                           bits_budget=what, bits_candidates=a.candidates, budget_samples=a.budget_samples, **args)
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
        bits, share = written_bits(model.wq_quant["layers"], base)
        if kind == "budget":  # the budget's own count must be the same number
            assert abs(model.wq_quant["bits_budget"]["bits"] - bits) < 1e-9, (model.wq_quant["bits_budget"]["bits"], bits)
        dequantized_copy_(model)
        r = perplexity(model.eval(), windows)
        total = sum(share.values())
        row = {"kind": kind, "algo": a.algo, "scheme": what if kind == "uniform" else f"budget {what:g}",
               "budget": what if kind == "budget" else None, "bits": bits, "ppl": r["ppl"],
               "share": {s: round(n / total, 4) for s, n in sorted(share.items())}, "seconds": seconds,
               "cpu_seconds": cpu_seconds, "load_avg_start": load0, "load_avg_end": os.getloadavg()}
        if kind == "budget":
            row["predicted_loss_increase"] = model.wq_quant["bits_budget"]["predicted_loss_increase"]
            row["layers"] = model.wq_quant["layers"]
        rows.append(row)
        log.info("%s %s: %.4f bits, ppl %.3f, %.1fs (%s)", a.algo, row["scheme"], bits, r["ppl"], seconds, row["share"])
        del model
        if a.output:
            _write(a.output, meta, rows)
    meta["load_average_at_end"] = os.getloadavg()
    if a.output:
        _write(a.output, meta, rows)
    if a.plot:
        plot(rows, a.plot, f"SmolLM2-135M (bundled), {a.algo}, CPU protocol")
    print(f"\n{meta['eval']}; algo {a.algo}; calibration {meta['calibration']}")
    print("| point | bits/weight | ppl | schemes (share of weights) |\n|---|---|---|---|")
    for r in rows:
        share = ", ".join(f"{s} {v:.0%}" for s, v in (r.get("share") or {}).items())
        bits = "" if r["bits"] is None else f"{r['bits']:.4f}"
        print(f"| {r['scheme']} | {bits} | {r['ppl']:.3f} | {share} |")


if __name__ == "__main__":
    main()
