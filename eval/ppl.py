"""Perplexity under the GPTQ/AWQ/AutoRound paper protocol.

Protocol ("windows", used for wikitext2, the Austen books and local files): join the test text with
"\\n\\n", tokenize it once, cut the ids into non-overlapping windows of `seqlen` tokens, drop the tail,
run each window on its own (no context carried over), and sum the fp32 cross-entropy of every
predicted token (seqlen - 1 per window: the first token of a window has nothing to condition on).
ppl = exp(nll_sum / tokens). The papers multiply the mean loss by seqlen instead of seqlen - 1; the
mean per token is the same, so the perplexity is the same.

C4 follows the GPTQ papers' own protocol instead: 256 random seqlen-token segments (seed 0) from
documents of validation shard 0 that are at least seqlen tokens long.

Windows are independent and summed in a fixed order in float64, so neither the batch size nor the
number of processes changes the result (each window's NLL is computed the same way whatever batch
it lands in; see `window_nll`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

AUSTEN_TEST_BOOK = "prideprejudice"  # never "emma": that is the calibration text


@dataclass
class PplData:
    """Token windows of one dataset, ready to evaluate."""

    name: str
    windows: torch.Tensor  # [n_windows, seqlen] int64
    protocol: str  # human-readable description of how the windows were cut

    @property
    def seqlen(self) -> int:
        return int(self.windows.shape[1])


# ------------------------------------------------------------------------------------- text


def _hub_wikitext2() -> str:
    from datasets import load_dataset

    ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return "\n\n".join(ds["text"])


def _hub_c4_docs() -> list[str]:
    from datasets import load_dataset

    ds = load_dataset(
        "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
    )
    return list(ds["text"])


def load_text(name: str) -> tuple[str, str]:
    """(text, source) for a dataset name, an Austen book, "austen" or a local text file."""
    from wq.assets import BOOKS, load_book

    if name == "wikitext2":
        return _hub_wikitext2(), "hub:wikitext/wikitext-2-raw-v1 test"
    if name == "austen":
        name = AUSTEN_TEST_BOOK
    if name in BOOKS:
        if name == "emma":
            log.warning("evaluating on emma, the calibration text: the numbers will flatter every quantizer")
        return load_book(name), f"janeaustenr:{name}"
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            return f.read(), f"file:{os.path.abspath(name)}"
    raise ValueError(
        f"unknown perplexity dataset {name!r}: use wikitext2, c4, austen, one of {', '.join(BOOKS)}, "
        "or the path of a local text file"
    )


def dataset_key(name: str) -> str:
    """The key a dataset is reported under ("austen" and the book name are the same text)."""
    if name == "austen":
        return AUSTEN_TEST_BOOK
    if os.path.isfile(name):
        return os.path.basename(name)
    return name


# ---------------------------------------------------------------------------------- windows


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, as the tokenizer's defaults have it (BOS only if it adds one)."""
    ids = tokenizer(text, return_tensors="pt", return_attention_mask=False).input_ids[0]
    return ids.to(torch.long)


_TOKENIZED: dict[tuple[str, str], torch.Tensor] = {}  # (tokenizer, text) fingerprints -> ids, this process


def tokenizer_fingerprint(tokenizer) -> str:
    """Same fingerprint, same token ids: the fast tokenizer's whole definition (vocabulary, merges, normalizer,
    pre-tokenizer, post-processor) hashed; a slow tokenizer's class, vocabulary and name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    raw = backend.to_str() if backend is not None else repr((type(tokenizer).__name__, tokenizer.name_or_path,
                                                             sorted(tokenizer.get_vocab().items())))
    return hashlib.sha1(raw.encode()).hexdigest()


def _tokenized(tokenizer, text: str) -> torch.Tensor:
    """tokenize_text, once per tokenizer and text in a process: a baseline and its quantized checkpoints carry
    copies of one tokenizer, and a whole novel costs about a second to tokenize each time."""
    key = (tokenizer_fingerprint(tokenizer), hashlib.sha1(text.encode()).hexdigest())
    if key not in _TOKENIZED:
        if len(_TOKENIZED) >= 8:
            _TOKENIZED.pop(next(iter(_TOKENIZED)))
        _TOKENIZED[key] = tokenize_text(tokenizer, text)
    return _TOKENIZED[key].clone()


def cut_windows(ids: torch.Tensor, seqlen: int, n_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from the start of ids; the tail is dropped."""
    n = ids.numel() // seqlen
    if n_windows is not None:
        if n_windows > n:
            log.warning("asked for %d windows of %d tokens, the text has only %d", n_windows, seqlen, n)
        n = min(n, n_windows)
    if n == 0:
        raise ValueError(f"text of {ids.numel()} tokens is shorter than one window of {seqlen}; lower --seqlen")
    return ids[: n * seqlen].view(n, seqlen)


def c4_windows(tokenizer, docs: list[str], seqlen: int, n_windows: int = 256, seed: int = 0) -> torch.Tensor:
    """GPTQ's C4 protocol: random documents of >= seqlen tokens, one random segment each."""
    rng = random.Random(seed)
    out = []
    while len(out) < n_windows:
        doc = docs[rng.randint(0, len(docs) - 1)]
        ids = tokenize_text(tokenizer, doc)
        if ids.numel() <= seqlen:
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[start : start + seqlen])
    return torch.stack(out)


def clip_seqlen(model, seqlen: int) -> int:
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if ctx and seqlen > ctx:
        log.warning("seqlen %d exceeds the model's context %d; clipped", seqlen, ctx)
        return int(ctx)
    return seqlen


def load_ppl_data(name: str, tokenizer, seqlen: int, n_windows: int | None = None) -> PplData:
    """Windows of `name` (see `load_text`) cut under that dataset's protocol."""
    key = dataset_key(name)
    if name == "c4":
        n = n_windows or 256
        w = c4_windows(tokenizer, _hub_c4_docs(), seqlen, n)
        return PplData(key, w, f"gptq-c4: {n} random segments of {seqlen} from validation shard 0, seed 0")
    text, source = load_text(name)
    ids = _tokenized(tokenizer, text)
    w = cut_windows(ids, seqlen, n_windows)
    total = ids.numel() // seqlen
    return PplData(
        key, w, f"windows: {source} joined by '\\n\\n', {ids.numel()} tokens, {w.shape[0]} of {total} windows of {seqlen}"
    )


# ------------------------------------------------------------------------------------- math


@torch.no_grad()
def window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window, fp32 cross-entropy: [n_windows] float64."""
    device = next(model.parameters()).device
    ids = windows.to(device)
    logits = model(input_ids=ids, use_cache=False).logits  # [b, seqlen, vocab]
    logits = logits[:, :-1].float()
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).sum(dim=1).double().cpu()


def shard(n: int, rank: int, world: int) -> list[int]:
    """Window indices of one rank: contiguous, balanced to within one window."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return list(range(start, start + per + (1 if rank < extra else 0)))


def perplexity(
    model,
    data: PplData,
    *,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict | None:
    """Evaluate `data` on `model`; with world_size > 1 every rank calls this on its own copy of the model
    (torch.distributed initialized) and rank 0 returns the result, the others None."""
    from tqdm import tqdm

    n, seqlen = data.windows.shape
    mine = shard(n, rank, world_size)
    vals: list[tuple[int, float]] = []
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    for idx in tqdm(batches, desc=f"ppl {data.name}", disable=not progress or rank != 0):
        nll = window_nll(model, data.windows[idx])
        vals.extend(zip(idx, nll.tolist()))
    if world_size > 1:
        gathered = [None] * world_size if rank == 0 else None
        torch.distributed.gather_object(vals, gathered, dst=0)
        if rank != 0:
            return None
        vals = [v for part in gathered for v in part]
    vals.sort()
    assert [i for i, _ in vals] == list(range(n)), "every window evaluated exactly once"
    per_window = [v for _, v in vals]
    nll_sum = math.fsum(per_window)
    tokens = n * (seqlen - 1)
    return {
        "ppl": math.exp(nll_sum / tokens),
        "nll_sum": nll_sum,
        "tokens": tokens,
        "seqlen": int(seqlen),
        "windows": int(n),
        "protocol": data.protocol,
        "window_nll": per_window,  # per-window sums, for the paired significance test in the report
    }
