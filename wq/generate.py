"""Run a prompt on a quantized checkpoint and print its tokens/s next to the dense model's.

    python -m wq.generate OUT_DIR --prompt "Elizabeth walked to" --tokens 64
    python -m wq.generate OUT_DIR --baseline HuggingFaceTB/SmolLM2-135M-Instruct --dtype bfloat16

The quantized model runs on whatever kernels dispatch picks for the device (on CPU: wq's AVX2
kernels, see docs/cpu.md; `WQ_KERNEL=reference` pins the reference).
The dense baseline (default: the bundled model; `--baseline none` skips it) runs greedy decode in
fp32 and bf16 in the same process, interleaved with the quantized model, so the speeds compare; the
load average at the start and end is printed with them. On a busy machine fewer threads are faster:
`--threads auto` (default) takes the CPUs other processes leave idle, and OpenMP threads sleep instead of
spinning while they wait (wq.threads).
"""

from __future__ import annotations

import argparse
import logging
import os
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


def build_parser() -> argparse.ArgumentParser:
    from .config import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m wq.generate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a directory written by wq (python -m wq.quantize ... -o DIR)")
    p.add_argument("--prompt", default="It is a truth universally acknowledged, that", help="the prompt")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per timed run")
    p.add_argument("--baseline", default="default", help="dense model (hub id, dir, 'default' = bundled, 'none')")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the quantized model's unquantized parts and activations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads; auto: the CPUs other processes leave idle (load average), at least 1")
    p.add_argument("--reps", type=int, default=2, help="timed runs per model (interleaved; the median is reported)")
    p.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU keep only the CPU kernels' weight layout (frees the checkpoint tensors)")
    return p


def choose_threads(spec: str | int | None) -> tuple[int, str]:
    """(threads, why) for --threads: a number as given, or "auto" from the CPUs and the load average."""
    from .threads import cpu_count, load_average, pick_threads

    if spec not in (None, "auto"):
        return int(spec), "--threads"
    cpus, load = cpu_count(), load_average()
    n = pick_threads(cpus, load)
    return n, f"auto: {cpus} CPUs, load average {'n/a' if load is None else f'{load:.2f}'}"


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    before = torch.get_num_threads()
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    try:
        return _run(args, threads, why)
    finally:
        torch.set_num_threads(before)  # callers in the same process (tests) keep theirs


def _run(args, threads: int, why: str) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import assets
    from .io import load
    from .threads import load_average

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
    load_start = load_average()
    for m in models.values():
        _decode(m, ids, 4)  # warm up: kernel caches, extension build
    for _ in range(args.reps):  # interleaved, so a change in the machine's load hits every model alike
        for name, m in models.items():
            out, tps = _decode(m, ids, args.tokens)
            speeds[name].append(tps)
            if m is quant:
                text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    load_end = load_average()
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"{args.prompt}{text}\n")
    dense = max((v for k, v in med.items() if k.startswith("dense")), default=None)
    for name, tps in med.items():
        rel = f"  {tps / dense:.2f}x the faster dense" if dense else ""
        print(f"{name:24s} {tps:8.2f} tokens/s{rel}")
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"{threads} thread(s) ({why}); load average {fmt(load_start)} at the start, {fmt(load_end)} at the end; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}; median of {args.reps} interleaved "
          f"run(s) of {args.tokens} tokens per model, one process")
    note = lm_head_note(quant) if args.device == "cpu" else None
    if note:
        print(note)
    return med


def cli(argv: list[str] | None = None) -> int:
    """`python -m wq.generate`: a missing checkpoint or model is one line (exit 2), not a traceback."""
    from .errors import UserError

    try:
        main(argv)
    except (UserError, FileNotFoundError) as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
