"""Calibration samples: `nsamples` token windows of `seqlen` tokens, drawn reproducibly with `seed`.

Sources (`calib`):
    None / "default" / "austen" / "emma"   the shipped Jane Austen corpus (Emma), offline
    a local .txt / .jsonl / .json file, or a folder of them (read through `datasets`)
    anything else: a Hugging Face Hub dataset name, e.g. "NeelNanda/pile-10k" (what auto-round uses),
        optionally "name:config" / "name:config:split"; read through `datasets.load_dataset`
    a LongTensor [n, L] or list of token-id lists: used as given (tests, custom pipelines)

Documents are shuffled with `seed`, joined with "\\n\\n" until there is enough text (or the source is
exhausted), tokenized once, and `nsamples` windows start at seeded random offsets. `seqlen` is
clipped to the tokens available and to the model's context length (logged when clipped).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_HUB_DATASET = "NeelNanda/pile-10k"
SHIPPED = {None, "default", "austen", "emma"}
TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json"}


def calibration_texts(calib: str | None, *, seed: int = 0) -> list[str]:
    """The source's documents (non-empty strings), shuffled with `seed`."""
    if calib in SHIPPED or (isinstance(calib, str) and calib.lower() in SHIPPED):
        from ..assets import load_book

        return [load_book("emma")]
    path = Path(str(calib)).expanduser()
    if path.exists():
        docs = _local_texts(path)
    else:
        docs = _hub_texts(str(calib))
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise ValueError(f"calibration source {calib!r} holds no text; give a .txt/.jsonl file or folder with "
                         f"text, or a Hub dataset with a 'text' column")
    random.Random(seed).shuffle(docs)
    return docs


def _local_texts(path: Path) -> list[str]:
    import datasets

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no calibration files found (looked for {', '.join(sorted(TEXT_SUFFIXES))})")
    docs: list[str] = []
    for kind in ("text", "json"):
        chosen = [str(f) for f in files if TEXT_SUFFIXES.get(f.suffix.lower(), "text") == kind]
        if not chosen:
            continue
        if kind == "text":  # one document per file: the text loader would split it into lines
            docs += [Path(f).read_text(encoding="utf-8", errors="replace") for f in chosen]
            continue
        ds = datasets.load_dataset("json", data_files=chosen, split="train")
        docs += _column(ds, ", ".join(chosen))
    return docs


def _hub_texts(name: str) -> list[str]:
    import datasets

    parts = name.split(":")
    ds_name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 else "train"
    try:
        ds = datasets.load_dataset(ds_name, config, split=split)
    except Exception as e:  # network, unknown name, gated: say what calib accepts
        raise ValueError(f"cannot load calibration dataset {name!r} ({type(e).__name__}: {e}). --calib takes a "
                         f"Hub dataset name (e.g. {DEFAULT_HUB_DATASET}, needs network), a local .txt/.jsonl "
                         f"file or folder, or 'default' for the shipped Austen corpus") from e
    return _column(ds, name)


def _column(ds, what: str) -> list[str]:
    for col in ("text", "content", "document"):
        if col in ds.column_names:
            return [str(t) for t in ds[col]]
    raise ValueError(f"{what}: no 'text' column (columns: {ds.column_names}); give JSON lines with a 'text' field")


def calibration_samples(
    calib,
    tokenizer,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    max_length: int | None = None,
) -> Tensor:
    """LongTensor [nsamples, seqlen'] of token windows, seqlen' = min(seqlen, tokens available, max_length)."""
    if isinstance(calib, Tensor) or (isinstance(calib, Sequence) and not isinstance(calib, str)
                                      and len(calib) and not isinstance(calib[0], str)):
        ids = calib if isinstance(calib, Tensor) else torch.tensor(calib, dtype=torch.long)
        if ids.dim() != 2:
            raise ValueError(f"pre-tokenized calibration must be [n, L] token ids, got shape {tuple(ids.shape)}")
        return ids[:nsamples].long()
    if tokenizer is None:
        raise ValueError("calibration text needs a tokenizer: pass tokenizer= to quantize_model")
    docs = calibration_texts(calib, seed=seed)
    limit = min(seqlen, max_length) if max_length else seqlen
    want = nsamples * limit * 2  # tokens to gather before sampling; 2x leaves room for distinct windows
    parts, have = [], 0
    for doc in docs:  # tokenize documents until there is enough text (pile-10k: a few hundred of 10k docs)
        parts.append(doc)
        have += len(doc) // 3  # rough chars -> tokens; the real count comes from one tokenization below
        if have >= want:
            break
    ids = torch.tensor(tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"], dtype=torch.long)
    n_tok = ids.numel()
    if n_tok < 2:
        raise ValueError(f"calibration text {calib!r} tokenizes to {n_tok} tokens; give more text")
    if limit > n_tok:
        log.warning("calibration seqlen %d clipped to %d: the text has only %d tokens", limit, n_tok, n_tok)
        limit = n_tok
    elif limit < seqlen:
        log.warning("calibration seqlen %d clipped to the model's context length %d", seqlen, limit)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tok - limit + 1, (nsamples,), generator=g)  # [nsamples]
    return torch.stack([ids[s:s + limit] for s in starts.tolist()])
