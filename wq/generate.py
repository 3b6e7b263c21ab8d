"""Run a prompt on a quantized checkpoint and print its tokens/s next to the dense model's.

    python -m wq.generate OUT_DIR --prompt "Elizabeth walked to" --tokens 64
    python -m wq.generate OUT_DIR --baseline HuggingFaceTB/SmolLM2-135M-Instruct --dtype bfloat16

The quantized model runs on whatever kernels dispatch picks for the device (on CPU: wq's AVX2
kernels, see docs/cpu.md; `WQ_KERNEL=reference` pins the reference).
The dense baseline (default: the bundled model; `--baseline none` skips it) runs greedy decode in
fp32 and bf16 in the same process, interleaved with the quantized model, so the speeds compare.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

log = logging.getLogger(__name__)


def lm_head_note(model, min_share: float = 0.1) -> str | None:
    """A hint when the output projection is dense and a large share of the weights: every decode step reads all
    of it, and on CPU it then costs more than the quantized layers (SmolLM2-135M: 21% of the matmul weights; with
    it at W8G128, decode went from 1.13-1.15x to 1.55-1.59x dense for +0.25% perplexity, docs/cpu.md)."""
    from .nn import QuantLinear

    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):  # quantized (QuantLinear) or absent
        return None
    # weights of every matmul a token goes through (embedding lookups read one row: left out)
    total = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, (torch.nn.Linear, QuantLinear)))
    share = head.in_features * head.out_features / total
    if share < min_share:
        return None
    return (f"note: lm_head ({head.out_features}x{head.in_features}, {share:.0%} of the matmul weights) is not "
            "quantized and every token reads it; quantizing it with `--override lm_head=W8G128` makes CPU decode "
            "faster at about no quality cost (docs/cpu.md, 'lm_head')")


def _decode(model, ids, tokens: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out, tokens / (time.perf_counter() - t0)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import assets
    from .io import load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a directory written by wq (python -m wq.quantize ... -o DIR)")
    p.add_argument("--prompt", default="It is a truth universally acknowledged, that")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--baseline", default="default", help="dense model (hub id, dir, 'default' = bundled, 'none')")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the quantized model's unquantized parts and activations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU keep only the CPU kernels' weight layout (frees the checkpoint tensors)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    quant = load(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype),
                 compact=args.compact and args.device == "cpu")
    models = {f"{quant.wq_quant['scheme']} ({args.dtype})": quant}
    base_path = None
    if args.baseline != "none":
        base_path = assets.resolve_model(None if args.baseline == "default" else args.baseline)
        for dt in (torch.float32, torch.bfloat16):
            models[f"dense {str(dt).split('.')[-1]}"] = AutoModelForCausalLM.from_pretrained(
                base_path, dtype=dt).to(args.device).eval()
    try:
        tok = AutoTokenizer.from_pretrained(args.checkpoint)
    except (OSError, ValueError):
        tok = AutoTokenizer.from_pretrained(base_path or assets.resolve_model(None))
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(args.device)

    speeds: dict[str, list[float]] = {k: [] for k in models}
    text = ""
    for m in models.values():
        _decode(m, ids, 4)  # warm up: kernel caches, extension build
    for _ in range(args.reps):
        for name, m in models.items():
            out, tps = _decode(m, ids, args.tokens)
            speeds[name].append(tps)
            if m is quant:
                text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"{args.prompt}{text}\n")
    dense = max((v for k, v in med.items() if k.startswith("dense")), default=None)
    for name, tps in med.items():
        rel = f"  {tps / dense:.2f}x the faster dense" if dense else ""
        print(f"{name:24s} {tps:8.2f} tokens/s{rel}")
    note = lm_head_note(quant) if args.device == "cpu" else None
    if note:
        print(note)
    return med


if __name__ == "__main__":
    main()
