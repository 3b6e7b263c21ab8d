"""Task accuracy through lm-evaluation-harness, around a model that is already loaded.

`HFLM(pretrained=<model object>)` assumes one process; `_ShardedHFLM` tells lm-eval its rank and world
size so it shards the requests itself and gathers the per-sample metrics on rank 0 through
torch.distributed (gloo on CPU under torchrun, NCCL under `accelerate launch`).

BOS handling is explicit: `add_bos` None means "what the tokenizer does by default", resolved here to a
bool, passed to HFLM and recorded in the report.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

from .local_tasks import LOCAL_TASKS, build_local_tasks

log = logging.getLogger(__name__)

PRESETS: dict[str, tuple[str, ...]] = {
    # offline, built from the shipped corpus (see local_tasks.py)
    "austen": LOCAL_TASKS,
    # the short zero-shot set of the GPTQ/AWQ/AutoRound papers
    "paper": ("arc_challenge", "arc_easy", "hellaswag", "lambada_openai", "piqa", "winogrande"),
    # Intel's low-bit open LLM leaderboard, zero-shot
    "leaderboard": (
        "arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai",
        "mmlu", "openbookqa", "piqa", "truthfulqa_mc1", "winogrande",
    ),
}
METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity")


def expand_tasks(names) -> list[str]:
    """Preset names and comma-separated lists to a flat, de-duplicated task list."""
    out: list[str] = []
    for item in names or ():
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            for t in PRESETS.get(name, (name,)):
                if t not in out:
                    out.append(t)
    return out


def resolve_add_bos(tokenizer, add_bos: bool | None) -> bool:
    if add_bos is not None:
        return bool(add_bos)
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def _make_lm(model, tokenizer, *, batch_size: int, add_bos: bool, max_length: int | None,
             rank: int, world_size: int, shared_contexts: bool = True):
    from lm_eval.models.huggingface import HFLM

    class _ShardedHFLM(HFLM):
        """HFLM over a loaded model that knows its place among `world_size` processes."""

        def __init__(self):
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                             add_bos_token=add_bos, max_length=max_length)
            self._rank, self._world_size = rank, world_size

        def all_gather(self, tensor):
            if self.world_size <= 1:
                return tensor
            t = tensor.reshape(-1) if tensor.dim() else tensor.reshape(1)
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, t.contiguous())
            return torch.cat(parts)

        def barrier(self):
            if self.world_size > 1:
                torch.distributed.barrier()

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            """Shared contexts and logits only where read (eval.loglik); HFLM's own path when that does not apply."""
            if not shared_contexts or self.backend != "causal" or getattr(self, "_plain_only", False):
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            from tqdm import tqdm

            from .loglik import loglikelihood

            tok = self.tokenizer
            pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
            bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood requests")
            got = loglikelihood(self.model, [(ctx, cont) for _, ctx, cont in requests], max_length=self.max_length,
                                pad_id=pad, progress=bar.update)
            bar.close()
            if got is None:
                self._plain_only = True
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            results, rest = got
            if rest:  # longer than the model's context: HFLM truncates them from the left
                sub = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm=True)
                results.update(zip(rest, sub))
            out = []
            for i, (key, _, _) in enumerate(requests):
                out.append(results[i])
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
            return out

    return _ShardedHFLM()


def _summarize(results: dict, tasks: list[str]) -> dict:
    """lm-eval's "acc,none" style keys to {task: {"acc", "acc_stderr", ..., "n"}}."""
    out = {}
    for task in tasks:
        res = results["results"].get(task)
        if res is None:
            log.warning("lm-eval returned no result for %s", task)
            continue
        row = {}
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            base = metric.removesuffix("_stderr")
            if base in METRICS and filt in ("none", ""):
                row[metric] = None if value in ("N/A", None) else float(value)
        n = results.get("n-samples", {}).get(task, {})
        if n:
            row["n"] = int(n.get("effective", n.get("original", 0)))
        out[task] = row
    return out


@functools.lru_cache(maxsize=4)
def _task_manager(include: str | None, include_defaults: bool):
    """Indexing lm-eval's own ~14k task YAMLs takes about a minute on a small CPU: skip it when only the
    local tasks are asked for, and index once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=include_defaults)


def _manager_for(names: list[str], n_local_docs: int):
    include = str(build_local_tasks(n_docs=n_local_docs)) if any(t in LOCAL_TASKS for t in names) else None
    return include, _task_manager(include, include_defaults=any(t not in LOCAL_TASKS for t in names))


class UnknownTaskError(ValueError):
    """A task name neither lm-eval nor the presets know (the message lists close matches)."""


def check_tasks(tasks, n_local_docs: int = 500) -> list[str]:
    """The expanded task list, or an UnknownTaskError naming each unknown task (with close matches) before any model
    is evaluated: lm-eval itself only fails when it reaches the tasks, after the perplexity runs."""
    import difflib

    names = expand_tasks(tasks)
    if not names:
        return names
    _, tm = _manager_for(names, n_local_docs)
    known = set(tm.all_tasks)
    unknown = [t for t in names if t not in known and not Path(t).is_file()]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, list(PRESETS) + sorted(known), n=3)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise UnknownTaskError(f"unknown lm-eval task(s): {'; '.join(hints)}. Give lm-eval task names, a task YAML, or a "
                         f"preset ({', '.join(PRESETS)}); give none for perplexity only")
    return names


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval's INFO/WARNING lines about a pre-built model (which is how eval hands it over) and its
    `git describe` (which prints "fatal: not a git repository" outside a clone) say nothing to a wq user:
    keep its errors, drop the rest, record no git hash."""
    import lm_eval.evaluator as ev
    logger = logging.getLogger("lm_eval")
    level, git_hash = logger.level, getattr(ev, "get_git_commit_hash", None)
    logger.setLevel(logging.ERROR)
    if git_hash is not None:
        ev.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.setLevel(level)
        if git_hash is not None:
            ev.get_git_commit_hash = git_hash


def run_tasks(
    model,
    tokenizer,
    tasks,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    add_bos: bool | None = None,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    n_local_docs: int = 500,
    bootstrap_iters: int = 1000,
) -> dict | None:
    """Evaluate `tasks` (names or presets) on a loaded model. Returns, on rank 0,
    {"tasks": {task: {"acc", "acc_stderr", "acc_norm", ..., "n"}}, "settings": {...}}; None elsewhere."""
    from lm_eval import simple_evaluate
    names = expand_tasks(tasks)
    if not names:
        return {"tasks": {}, "settings": {}}
    include, tm = _manager_for(names, n_local_docs)
    bos = resolve_add_bos(tokenizer, add_bos)
    with _quiet_lm_eval():
        lm = _make_lm(model, tokenizer, batch_size=batch_size, add_bos=bos, max_length=max_length,
                      rank=rank, world_size=world_size)
        results = simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
            task_manager=tm, log_samples=False, bootstrap_iters=bootstrap_iters,
        )
    if rank != 0:
        return None
    settings = {"tasks": names, "batch_size": batch_size, "limit": limit, "add_bos": bos,
                "num_fewshot": num_fewshot, "local_docs": n_local_docs if include else None}
    return {"tasks": _summarize(results, names), "settings": settings}
