"""Serve each exported format in vLLM and compare against wq's own model (needs vLLM and a CUDA GPU).

    python scripts/vllm_smoke.py OUT [--prompts 4] [--max-tokens 32] [--tol 0.1]

OUT is a checkpoint directory or a multi-format output (OUT/<format>/). For every format vLLM reads
(gptq, auto-round, compressed-tensors; wq's native format is not a vLLM format), it loads the directory
with vllm.LLM, generates greedily, and compares with wq.load of the same directory:
  - greedy continuations: the fraction of prompts whose first --match-tokens tokens agree
  - prompt logprobs: max |logprob_vllm - logprob_wq| over the prompt tokens (vLLM prompt_logprobs)
Directories whose wq.json says vLLM cannot load them (e.g. in % G != 0) are reported and skipped.
Exit 1 if any format fails. Status: written and importable here; never run (no GPU / vLLM on the
build machine), so its results are owed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = ["The capital of France is", "It is a truth universally acknowledged, that",
           "def fibonacci(n):", "The three primary colours are"]
VLLM_METHODS = {"gptq", "auto-round", "compressed-tensors"}


def checkpoints(out: Path) -> list[Path]:
    if (out / "config.json").exists():
        return [out]
    return sorted(d for d in out.iterdir() if (d / "config.json").exists())


def wq_reference(path: Path, prompts: list[str], max_tokens: int):
    """Greedy continuations and prompt token logprobs from wq's own model (the reference kernel)."""
    import torch
    from transformers import AutoTokenizer

    import wq

    tok = AutoTokenizer.from_pretrained(path)
    model = wq.load(path, device="cuda", dtype=torch.float16)
    gens, logprobs = [], []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids.cuda()
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        gens.append(out[0, ids.shape[1]:].tolist())
        logprobs.append(lp.cpu().tolist())
    del model
    torch.cuda.empty_cache()
    return gens, logprobs


def vllm_run(path: Path, prompts: list[str], max_tokens: int):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="float16", enforce_eager=True, gpu_memory_utilization=0.4)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=0)
    outs = llm.generate(prompts, params)
    gens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs]
    del llm
    return gens, logprobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="checkpoint directory or multi-format output directory")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--match-tokens", type=int, default=8, help="leading greedy tokens that must agree")
    ap.add_argument("--tol", type=float, default=0.1, help="max prompt logprob difference")
    args = ap.parse_args(argv)
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError as e:
        print(f"vLLM is not installed ({e}); pip install vllm on a CUDA machine", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("no CUDA GPU: vLLM smoke test needs one", file=sys.stderr)
        return 2
    prompts, failed, rows = PROMPTS[: args.prompts], False, []
    for d in checkpoints(args.out):
        method = json.loads((d / "config.json").read_text())["quantization_config"]["quant_method"]
        who = (json.loads((d / "wq.json").read_text()).get("consumers") or {}) if (d / "wq.json").exists() else {}
        if method not in VLLM_METHODS or who.get("vllm"):
            rows.append((d.name, "skipped", who.get("vllm") or f"{method} is not a vLLM format"))
            continue
        ref_gen, ref_lp = wq_reference(d, prompts, args.max_tokens)
        gen, lp = vllm_run(d, prompts, args.max_tokens)
        agree = sum(a[: args.match_tokens] == b[: args.match_tokens] for a, b in zip(gen, ref_gen)) / len(prompts)
        dlp = max(abs(x - y) for a, b in zip(lp, ref_lp) for x, y in zip(a, b))
        ok = agree == 1.0 and dlp <= args.tol
        failed |= not ok
        rows.append((d.name, "ok" if ok else "FAIL", f"greedy agree {agree:.0%}, max |dlogprob| {dlp:.4f}"))
    for name, status, note in rows:
        print(f"{name:24s} {status:8s} {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
