"""Perplexity under DESIGN.md's CPU protocol, small and dependency-free (stand-in for eval.ppl).

Text joined by "\\n\\n" (wq.assets.load_book does that), tokenized once with the tokenizer's defaults,
cut into non-overlapping windows of `seqlen` from the start (tail dropped), the first `windows` of
them; mean next-token NLL in fp32 over all windows, ppl = exp(mean).

    python scripts/ppl_quick.py [--book prideprejudice] [--seqlen 512] [--windows 40]   # the BF16 baseline
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


def windows_for(tokenizer, book: str = "prideprejudice", seqlen: int = 512, windows: int = 40) -> torch.Tensor:
    from wq.assets import load_book

    ids = tokenizer(load_book(book), return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    n = min(ids.numel() // seqlen, windows)
    return ids[: n * seqlen].view(n, seqlen)  # [n, seqlen]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> dict:
    nll_sum, tokens = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [b, L-1, vocab]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll_sum += float(nll)
        tokens += ids[:, 1:].numel()
    return {"ppl": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens, "seqlen": windows.shape[1]}


def load_fp32(model: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wq.assets import resolve_model

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return m, tok


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--book", default="prideprejudice")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    a = ap.parse_args()
    m, tok = load_fp32(a.model)
    print(perplexity(m, windows_for(tok, a.book, a.seqlen, a.windows)))
