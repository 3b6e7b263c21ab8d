"""Does the Fisher estimate of --bits-budget rank layers like the real loss increase?

For `--layers` Linears of the bundled model (spread over depth and kinds) and each `--schemes`, the
predicted increase 1/2 sum F (w - rtn(w))^2 (wq.budget, F from --fisher-samples Emma samples) is set
beside the measured increase of the mean token loss on --eval-samples other Emma samples when only that
layer is quantized (rtn). Prints both, and their Spearman rank correlation.

    python scripts/budget_check.py -o docs/results/budget_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from ppl_quick import load_fp32  # noqa: E402

from wq.algorithms.rtn import rtn_quantize  # noqa: E402
from wq.budget import fisher_diagonal, predicted_costs  # noqa: E402
from wq.calib.data import calibration_samples  # noqa: E402
from wq.scheme import QuantScheme  # noqa: E402


@torch.no_grad()
def mean_loss(model, ids) -> float:
    return float(sum(model(input_ids=s[None], labels=s[None]).loss for s in ids) / ids.shape[0])


def spearman(a, b) -> float:
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", nargs="+", type=int, default=[0, 8, 15, 22, 29])
    ap.add_argument("--kinds", nargs="+", default=["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                   "mlp.up_proj", "mlp.down_proj"])
    ap.add_argument("--schemes", nargs="+", default=["W2G128", "W3G128"])
    ap.add_argument("--fisher-samples", type=int, default=4)
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_fp32()
    ids = calibration_samples("emma", tok, nsamples=a.fisher_samples + a.eval_samples, seqlen=a.seqlen, seed=0)
    fit, held = ids[: a.fisher_samples], ids[a.fisher_samples:]
    names = [f"model.layers.{i}.{k}" for i in a.layers for k in a.kinds]
    fisher = fisher_diagonal(model, names, fit)
    weights = {n: model.get_submodule(n).weight.detach() for n in names}
    schemes = [QuantScheme.parse(s) for s in a.schemes]
    pred = predicted_costs(weights, fisher, schemes)
    base = mean_loss(model, held)
    rows = []
    for n in names:
        for s in schemes:
            lin = model.get_submodule(n)
            orig = lin.weight.data.clone()
            lin.weight.data = rtn_quantize(orig, s).packed.dequantize()
            measured = mean_loss(model, held) - base
            lin.weight.data = orig
            rows.append({"layer": n, "scheme": str(s), "predicted": pred[n][str(s)], "measured": measured})
            print(rows[-1], flush=True)
    rho = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    print(f"Spearman rank correlation, predicted vs measured loss increase over {len(rows)} (layer, scheme): {rho:.3f}")
    if a.output:
        meta = {"command": "python " + " ".join(sys.argv), "load_average": os.getloadavg(), "spearman": rho,
                "base_loss": base}
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
