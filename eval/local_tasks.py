"""Offline lm-eval tasks built from the shipped Austen corpus (no network needed).

- `austen_lastword` (LAMBADA style): a paragraph with its last word removed; the model must put the
  highest probability on that exact word (greedy, all its tokens), acc and perplexity of the word.
- `austen_continuation` (HellaSwag style): the opening sentences of a paragraph and four candidate next
  sentences, one true and three drawn from elsewhere in the same book; acc and acc_norm.

Books: Persuasion and Northanger Abbey for the last word, Sense and Sensibility and Mansfield Park for
the continuation. Never Emma (the calibration text) nor Pride and Prejudice (the perplexity text).
Everything is derived deterministically (seeded) from the text, written as JSONL plus a task YAML
with absolute `data_files` paths (relative ones would resolve against the working directory).
"""

from __future__ import annotations

import bisect
import json
import os
import random
import re
import tempfile
from pathlib import Path

LOCAL_TASKS_VERSION = 2
LASTWORD_BOOKS = ("persuasion", "northangerabbey")
CONTINUATION_BOOKS = ("sensesensibility", "mansfieldpark")
LOCAL_TASKS = ("austen_lastword", "austen_continuation")

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"'A-Z])")
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})(?P<tail>[.!?;:,\"')\-]*)$", re.S)


def _paragraphs(book: str) -> list[str]:
    from wq.assets import load_book

    return [p for p in load_book(book).split("\n\n") if p.strip()]


def lastword_docs(n_docs: int = 500, seed: int = 1234) -> list[dict]:
    """Paragraphs of 30-150 words ending in a word of >= 3 letters; context = the last <= 120 words
    before it, target = " " + that word (final punctuation dropped)."""
    pool = []
    for book in LASTWORD_BOOKS:
        for p in _paragraphs(book):
            words = p.split()
            if not 30 <= len(words) <= 150:
                continue
            m = _LAST_WORD.match(p)
            if not m:
                continue
            context = " ".join(m["context"].split()[-120:])
            pool.append({"context": context, "target": " " + m["word"], "book": book})
    random.Random(seed).shuffle(pool)
    return pool[:n_docs]


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def continuation_docs(n_docs: int = 500, seed: int = 4321, n_choices: int = 4) -> list[dict]:
    """Context = the first sentences of a paragraph (>= 12 words); choices = the true next sentence and
    distractors of similar length from other paragraphs of the same book; label = index of the true one."""
    rng = random.Random(seed)
    docs = []
    for book in CONTINUATION_BOOKS:
        paras = [_sentences(p) for p in _paragraphs(book)]
        # every usable sentence, sorted by word count, to draw distractors of about the true one's length
        pool = sorted((len(s.split()), j, s) for j, ss in enumerate(paras) for s in ss if 6 <= len(s.split()) <= 40)
        lengths = [n for n, _, _ in pool]
        for i, ss in enumerate(paras):
            if len(ss) < 2:
                continue
            k = 1
            while k < len(ss) - 1 and len(" ".join(ss[:k]).split()) < 12:
                k += 1
            context, true = " ".join(ss[:k]), ss[k]
            n_true = len(true.split())
            if len(context.split()) < 12 or not 6 <= n_true <= 40:
                continue
            tol = max(3, n_true // 4)
            lo, hi = bisect.bisect_left(lengths, n_true - tol), bisect.bisect_right(lengths, n_true + tol)
            choices: list[str] = []
            for _ in range(50):  # rejection sampling: another paragraph, not a duplicate
                _, j, s = pool[rng.randrange(lo, hi)]
                if j != i and s != true and s not in choices:
                    choices.append(s)
                    if len(choices) == n_choices - 1:
                        break
            if len(choices) < n_choices - 1:
                continue
            label = rng.randrange(n_choices)
            choices.insert(label, true)
            docs.append({"context": context, "choices": choices, "label": label, "book": book})
    rng.shuffle(docs)
    return docs[:n_docs]


_LASTWORD_YAML = """\
task: austen_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

_CONTINUATION_YAML = """\
task: austen_continuation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def _write_atomic(path: Path, text: str) -> None:
    """Several ranks may write the same (deterministic) file at once: write aside, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def build_local_tasks(root: str | Path | None = None, n_docs: int = 500) -> Path:
    """Write the JSONL data and task YAMLs (once) and return the directory to give lm-eval's
    TaskManager(include_path=...)."""
    if root is None:
        from wq.assets import cache_dir

        root = cache_dir() / "eval_tasks" / f"v{LOCAL_TASKS_VERSION}-n{n_docs}"
    root = Path(root).absolute()
    if all((root / f"{t}.yaml").exists() for t in LOCAL_TASKS):
        return root
    root.mkdir(parents=True, exist_ok=True)
    for name, docs, yaml in (
        ("austen_lastword", lastword_docs(n_docs), _LASTWORD_YAML),
        ("austen_continuation", continuation_docs(n_docs), _CONTINUATION_YAML),
    ):
        data = root / f"{name}.jsonl"
        _write_atomic(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        _write_atomic(root / f"{name}.yaml", yaml.format(data=json.dumps(str(data)), version=LOCAL_TASKS_VERSION))
    return root
