"""lm-eval loglikelihood requests, each context computed once and logits only where they are read.

lm-eval's HFLM runs every (context, continuation) request as its own sequence `(ctx + cont)[:-1]` and takes
the full vocabulary's log-softmax at every position. Two things in that are waste, and neither changes a
number (same inputs, same math, fp32 log-softmax; only the summation order inside the model differs):

- A multiple-choice document sends its context once per choice. Here the choices of one context are packed
  into one row behind a single copy of it: `C K1[:-1] K2[:-1] ...`, each choice block at the positions it
  would have had (position ids continue from the context), seeing the context and itself through a 4-D mask,
  never the other choices. The first token of every choice is predicted from the context's last position.
  On the Austen continuation task that is 65k instead of 119k tokens per model.
- Only the positions that predict a continuation token need the output projection and the softmax
  (lastword: 1-3 of ~90). `logits_to_keep` (transformers' own argument) restricts the head to the union of
  those positions in a batch.

Rows are batched by a token budget, longest first, right-padded (pads attend to themselves only).
A model whose forward does not honour position ids and a 4-D mask (ALiBi, for one) is caught by
`verify`: the first rows are also scored the plain way, and any disagreement beyond float noise falls back
to HFLM's own path for the whole run, with a warning.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TOKEN_BUDGET = 4096  # tokens per forward (rows x padded length)


@dataclass
class Row:
    """One packed sequence: a context and the continuations that share it."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    block: list[int] = field(default_factory=list)  # 0: context; j >= 1: the j-th continuation's tokens
    # (request index, continuation tokens, the row positions whose logits predict them)
    members: list[tuple[int, list[int], list[int]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def pack(requests: Sequence[tuple[list[int], list[int]]], max_length: int) -> tuple[list[Row], list[int]]:
    """Rows for (context tokens, continuation tokens) requests: those with the same context share one row (up to
    `max_length` tokens). Returns (rows, indices of requests left out: longer than max_length + 1, which the caller
    scores HFLM's way, truncated from the left)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    too_long = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont or len(ctx) + len(cont) > max_length + 1:
            too_long.append(i)
            continue
        groups.setdefault(tuple(ctx), []).append(i)
    rows = []
    for ctx, members in groups.items():
        row = None
        for i in members:
            cont = requests[i][1]
            if row is None or len(row) + len(cont) - 1 > max_length:
                row = Row(list(ctx), list(range(len(ctx))), [0] * len(ctx))
                rows.append(row)
            j = len(row.members) + 1
            start = len(row)
            c = len(ctx)
            # cont[0] is predicted at the context's last position, cont[t] at the block's position t-1
            preds = [c - 1] + [start + t for t in range(len(cont) - 1)]
            row.tokens += cont[:-1]
            row.positions += list(range(c, c + len(cont) - 1))
            row.block += [j] * (len(cont) - 1)
            row.members.append((i, list(cont), preds))
    return rows, too_long


def row_mask(row: Row, length: int) -> torch.Tensor:
    """[length, length] bool, True = may attend: causal, and a continuation block sees the context and itself only.
    Padding positions (past len(row)) see themselves only, so no softmax row is empty."""
    n = len(row)
    block = torch.tensor(row.block + [-1] * (length - n))
    q, k = block[:, None], block[None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & ((k == 0) | (k == q)) & (q >= 0) & (k >= 0)
    return allowed | torch.eye(length, dtype=torch.bool)


def batches(rows: list[Row], budget: int = TOKEN_BUDGET) -> list[list[Row]]:
    """Longest first; a batch holds rows while rows x longest <= budget (always at least one row)."""
    out: list[list[Row]] = []
    for row in sorted(rows, key=len, reverse=True):
        if out and (len(out[-1]) + 1) * len(out[-1][0]) <= budget:
            out[-1].append(row)
        else:
            out.append([row])
    return out


def accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def score_batch(model, rows: list[Row], *, pad_id: int = 0, keep_logits: bool = True) -> dict[int, tuple[float, bool]]:
    """{request index: (sum of continuation log-probs, every continuation token is the argmax)} for one batch."""
    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, length, length), dtype=dtype)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r.tokens)
        pos[b, : len(r)] = torch.tensor(r.positions)
        mask[b, 0].masked_fill_(~row_mask(r, length), torch.finfo(dtype).min)
    needed = sorted({p for r in rows for _, _, preds in r.members for p in preds})
    kw = {}
    if keep_logits:
        kw["logits_to_keep"] = torch.tensor(needed, device=device)
    logits = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                   use_cache=False, **kw).logits  # [b, len(needed) or length, vocab]
    where = {p: k for k, p in enumerate(needed)} if keep_logits else None
    out = {}
    for b, r in enumerate(rows):
        for i, cont, preds in r.members:
            idx = torch.tensor([where[p] for p in preds] if where is not None else preds, device=logits.device)
            lp = F.log_softmax(logits[b, idx].float(), dim=-1)  # [len(cont), vocab]
            target = torch.tensor(cont, device=lp.device)
            out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return out


@torch.no_grad()
def score_plain(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """HFLM's math for one request: the sequence (ctx + cont)[:-1], the last len(cont) positions' log-softmax."""
    device = next(model.parameters()).device
    inp = torch.tensor([(ctx + cont)[:-1]], device=device)
    lp = F.log_softmax(model(input_ids=inp, use_cache=False).logits[0, -len(cont):].float(), dim=-1)
    target = torch.tensor(cont, device=lp.device)
    return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def verify(model, rows: list[Row], requests, results: dict[int, tuple[float, bool]], n: int = 3) -> str | None:
    """None if the packed scores of up to `n` requests of `rows` equal the plain ones (float noise aside), else why not."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    rel, atol = (1e-4, 2e-3) if dtype == torch.float32 else (2e-2, 0.25)
    checked = 0
    for r in rows:
        for i, _, _ in r.members:
            ref = score_plain(model, *requests[i])
            got = results[i]
            if not math.isclose(got[0], ref[0], rel_tol=rel, abs_tol=atol):
                return f"request {i}: packed log-prob {got[0]:.5f}, plain {ref[0]:.5f}"
            checked += 1
            if checked >= n:
                return None
    return None


def loglikelihood(model, requests: Sequence[tuple[list[int], list[int]]], *, max_length: int,
                  pad_id: int = 0, budget: int = TOKEN_BUDGET, progress: Callable[[int], None] | None = None,
                  check: bool = True) -> tuple[dict[int, tuple[float, bool]], list[int]] | None:
    """Score (context tokens, continuation tokens) requests. Returns ({index: (log-prob, greedy)}, indices left to
    the caller: over max_length), or None when `check` finds the packed path does not reproduce this model's
    plain forward (the caller then uses its own)."""
    rows, rest = pack(requests, max_length)
    keep = accepts_logits_to_keep(model)
    results: dict[int, tuple[float, bool]] = {}
    for k, batch in enumerate(batches(rows, budget)):
        results.update(score_batch(model, batch, pad_id=pad_id, keep_logits=keep))
        if k == 0 and check:
            why = verify(model, batch, requests, results)
            if why is not None:
                log.warning("shared-context scoring does not reproduce %s's plain forward (%s); scoring every "
                            "request on its own, as lm-eval does", type(model).__name__, why)
                return None
        if progress is not None:
            progress(sum(len(r.members) for r in batch))
    return results, rest
