"""Evaluate quantized checkpoints next to their BF16 baseline, in one run, under one protocol.

    python -m eval.run --baseline MODEL --quant DIR [--quant DIR ...] [--ppl NAME|FILE ...]
                       [--seqlen 2048] [--windows N] [--tasks PRESET|TASK ...] [--limit N] [-o OUT]

MODEL: a hub id, a local directory, or "default" (the bundled SmolLM2-135M-Instruct). OUT defaults to
`<first quant>/eval/`; it receives report.json, report.md and report.png (see eval/report.py).

Several processes (every one loads the whole model; perplexity windows and lm-eval requests are
sharded, sums gathered on rank 0; the numbers equal a single process's):
    GPUs:  accelerate launch --num_processes 8 -m eval.run ...
    CPU:   torchrun --nproc-per-node 2 -m eval.run ...
           (`accelerate launch --cpu --num_processes 2` starts only one process on CPU)

From Python (what `wq.quantize --eval` calls): `eval.run.evaluate(...)`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from wq.config import HelpFormatter
from wq.errors import UserError
from wq.kernels.dispatch import exact_kernels

from . import models as M
from .cache import ResultCache
from .local_tasks import LOCAL_TASKS_VERSION
from .ppl import clip_seqlen, load_ppl_data, perplexity
from .report import SCHEMA, build_report, write_report
from .tasks import UnknownTaskError, check_tasks, resolve_add_bos, run_tasks

log = logging.getLogger("eval.run")



def dist_state(device: str | None = None):
    """accelerate's PartialState: cpu (gloo) under torchrun on CPU, the usual GPU setup otherwise."""
    from accelerate import PartialState

    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def baseline_cache_dir() -> Path:
    """$WQ_EVAL_CACHE, else <wq cache>/eval."""
    if os.environ.get("WQ_EVAL_CACHE"):
        return Path(os.environ["WQ_EVAL_CACHE"])
    from wq.assets import cache_dir

    return cache_dir() / "eval"


def versions() -> dict:
    out = {"python": platform.python_version(), "eval_schema": SCHEMA, "local_tasks": LOCAL_TASKS_VERSION}
    for mod in ("torch", "transformers", "accelerate", "lm_eval", "wq"):
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            out[mod] = None
    return out


@exact_kernels()  # the report measures the weights: no int8 rounding of activations by a CPU speed kernel
def _evaluate_model(model, tokenizer, data, tasks, *, batch_size, task_batch_size, limit, add_bos,
                    num_fewshot, local_docs, state, label) -> dict | None:
    t0 = time.time()
    res = {"ppl": {}, "tasks": {}}
    for key, d in data.items():
        r = perplexity(model, d, batch_size=batch_size, rank=state.process_index, world_size=state.num_processes)
        if r is not None:
            res["ppl"][key] = r
            log.info("%s: ppl %s = %.4f (%d windows of %d)", label, key, r["ppl"], r["windows"], r["seqlen"])
    if tasks:
        t = run_tasks(model, tokenizer, tasks, batch_size=task_batch_size, limit=limit, add_bos=add_bos,
                      num_fewshot=num_fewshot, rank=state.process_index, world_size=state.num_processes,
                      n_local_docs=local_docs)
        if t is not None:
            res["tasks"] = t["tasks"]
            for name, row in t["tasks"].items():
                log.info("%s: %s %s", label, name, {k: round(v, 4) for k, v in row.items() if k in ("acc", "acc_norm")})
    res["seconds"] = round(time.time() - t0, 1)
    return res if state.is_main_process else None


def _evaluate_quant(model, qtok, name, info, spec, tok, data, tasks, forward, dt, state, kw) -> dict | None:
    """One quantized model under the run's protocol: {"model", "path", "scheme", "algo", "bits_per_weight", ...}.
    A model the caller passed in is given back with its QuantLinears restored."""
    bpw = M.bits_per_weight(model)
    replaced = M.dequantize_linears(model, dt) if forward == "dequantized" else {}
    if qtok is not None and qtok.get_vocab() != tok.get_vocab():
        log.warning("%s: its tokenizer differs from the baseline's; evaluating with the baseline's", name)
    res = _evaluate_model(model, tok, data, tasks, label=name, **kw)
    M.restore_linears(model, replaced)
    del model, replaced
    _free()
    if not state.is_main_process:
        return None
    return {"model": str(spec), "scheme": (info or {}).get("scheme"), "algo": (info or {}).get("algo"),
            "bits_per_weight": bpw, **res}


def _free():
    """Release memory after the caller dropped its last reference to a model."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(
    quant,
    *,
    baseline: str = "default",
    ppl=("austen",),
    tasks=(),
    seqlen: int = 2048,
    windows: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    task_batch_size: int = 8,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    quant_forward: str = "auto",
    add_bos: bool | None = None,
    num_fewshot: int | None = None,
    local_docs: int = 500,
    revision: str | None = None,
    tokenizer=None,
    names=None,
    cache: bool = True,
    out: str | os.PathLike | None = None,
) -> dict | None:
    """Evaluate one or more quantized models against `baseline` under one protocol; return the report.

    quant: a checkpoint directory, a loaded model (e.g. the one `wq.quantize_model` just quantized), or a
    list of them. baseline: hub id, directory or "default". ppl: dataset names (wikitext2, c4, austen, a
    book) or text files. tasks: lm-eval task names or presets (austen, paper, leaderboard). windows: use
    the first N windows only; limit: first N docs per task. dtype: one for every model (default fp32 on
    CPU, bf16 on GPU). quant_forward: "kernels" runs the packed kernels, "dequantized" swaps in nn.Linear
    with the dequantized weights (the reference kernel's numbers, far faster on CPU); "auto" = kernels on
    GPU, dequantized on CPU. names: report names for the quant entries (default: directory and algorithm).
    cache: reuse the cached results of a model evaluated before under the same settings and versions (the baseline,
    and every checkpoint directory: keyed by its files' names, sizes and modification times). out: also write report.json/.md/.png there.
    Under several processes every rank calls this; rank 0 gets the report, the others None.
    """
    from transformers import AutoConfig, AutoTokenizer

    state = dist_state(device)
    dev = torch.device(device) if device else state.device
    dt = M.parse_dtype(dtype, dev)
    forward = M.resolve_quant_forward(quant_forward, dev)
    quants = list(quant) if isinstance(quant, list | tuple) else [quant]
    tasks = check_tasks(tasks, local_docs)  # unknown names fail here, before any model runs
    base_path = M.resolve(baseline, revision)
    for q in quants:  # a mistyped --quant fails now, not after the baseline ran
        if not isinstance(q, torch.nn.Module):
            M.resolve(str(q))
    tok = tokenizer or AutoTokenizer.from_pretrained(base_path, revision=revision)
    seqlen = clip_seqlen(AutoConfig.from_pretrained(base_path, revision=revision), seqlen)
    data = {}
    for name in ppl or ():
        d = load_ppl_data(name, tok, seqlen, windows)
        data[d.name] = d
    settings = {
        "dtype": str(dt).removeprefix("torch."), "device": dev.type, "world_size": state.num_processes,
        "quant_forward": forward, "seqlen": seqlen, "windows": windows, "ppl_batch_size": batch_size,
        "ppl_protocols": {k: d.protocol for k, d in data.items()},
        "tasks": {"tasks": tasks, "limit": limit, "batch_size": task_batch_size,
                  "add_bos": resolve_add_bos(tok, add_bos), "num_fewshot": num_fewshot,
                  "local_docs": local_docs} if tasks else None,
    }
    kw = dict(batch_size=batch_size, task_batch_size=task_batch_size, limit=limit, add_bos=add_bos,
              num_fewshot=num_fewshot, local_docs=local_docs, state=state)

    # ---- every model's results are cached per part (each perplexity dataset, the task list): what was measured
    # before under the same settings and versions is read back, and a model is loaded only for what is missing
    cache_ = ResultCache(baseline_cache_dir(), enabled=cache, state=state, versions=versions())
    run_on = {"dtype": settings["dtype"], "device": settings["device"]}
    ppl_parts = {k: {"part": "ppl", "dataset": k, "protocol": d.protocol, "seqlen": seqlen, "windows": windows,
                     **run_on} for k, d in data.items()}
    task_part = {"part": "tasks", **(settings["tasks"] or {}), **run_on} if tasks else None

    def measure(kind: str, fingerprint: str, extra: dict, compute) -> dict | None:
        """Cached parts merged with the missing ones, which compute(data, tasks) -> result measures."""
        paths = {("ppl", k): cache_.path(kind, fingerprint, {**part, **extra}) for k, part in ppl_parts.items()}
        if task_part is not None:
            paths[("tasks",)] = cache_.path(kind, fingerprint, {**task_part, **extra})
        hits = {p: cache_.get(path) for p, path in paths.items()}
        todo_data = {k: d for k, d in data.items() if hits[("ppl", k)] is None}
        todo_tasks = tasks if task_part is not None and hits[("tasks",)] is None else []
        res = {"ppl": {}, "tasks": {}, "seconds": 0.0}
        if todo_data or todo_tasks:
            res = compute(todo_data, todo_tasks)
            if res is None:  # not rank 0
                return None
            meta = {k: v for k, v in res.items() if k not in ("ppl", "tasks", "seconds")}
            for k in todo_data:
                cache_.put(paths[("ppl", k)], {**meta, "ppl": {k: res["ppl"][k]}})
            if todo_tasks:
                cache_.put(paths[("tasks",)], {**meta, "tasks": res["tasks"]})
        if not state.is_main_process:
            return None
        for hit in hits.values():
            if hit is not None:
                for key, value in hit.items():
                    if key in ("ppl", "tasks"):
                        res[key].update(value)
                    else:
                        res.setdefault(key, value)
        res["ppl"] = {k: res["ppl"][k] for k in data}  # the order asked for
        return res

    def run_baseline(todo_data, todo_tasks):
        model, _, _ = M.load_model(base_path, device=dev, dtype=dt, revision=revision)
        res = _evaluate_model(model, tok, todo_data, todo_tasks, label="baseline", **kw)
        del model
        _free()
        return res

    base_res = measure("baseline", M.fingerprint(base_path, revision), {}, run_baseline)
    if state.is_main_process:
        base_res = {"model": str(baseline), "path": base_path, "bits_per_weight": 16.0, **base_res}

    # ---- each quantized model, same windows, same tasks, same dtype
    results, taken = {}, set()
    for i, q in enumerate(quants):
        if isinstance(q, torch.nn.Module):
            wq_quant = getattr(q, "wq_quant", None) or {}
            info = {"scheme": wq_quant.get("scheme"), "algo": wq_quant.get("algo")}
            spec = getattr(getattr(q, "config", None), "name_or_path", None) or "model"
            name = names[i] if names else M.model_name(info["scheme"] or "model", info, taken)
            res = _evaluate_quant(q, None, name, info, spec, tok, data, tasks, forward, dt, state, kw)
        else:
            spec = str(q)
            path = M.resolve(spec)
            info = M.quant_info(path)
            name = names[i] if names else M.model_name(spec, info, taken)

            def run_one(todo_data, todo_tasks, spec=spec, name=name):
                model, qtok, info = M.load_model(spec, device=dev, dtype=dt)
                return _evaluate_quant(model, qtok, name, info, spec, tok, todo_data, todo_tasks, forward, dt, state,
                                       kw)

            res = measure("quant", M.fingerprint(path), {"quant_forward": forward}, run_one)
            if res is not None:
                res.update(model=spec, scheme=(info or {}).get("scheme"), algo=(info or {}).get("algo"))
        taken.add(name)
        if state.is_main_process:
            results[name] = res

    if not state.is_main_process:
        return None
    report = build_report(base_res, results, settings, versions())
    if out is not None:
        write_report(report, out)
        log.info("wrote %s/report.{json,md,png}", out)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--baseline", default="default", help="hub id, directory, or 'default' (bundled model)")
    p.add_argument("--quant", action="append", required=True, help="quantized checkpoint directory (repeatable)")
    p.add_argument("--ppl", nargs="*", action="extend", default=None,
                   help="wikitext2, c4, austen, an Austen book name or a text file (default: austen)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (clipped to the model's context)")
    p.add_argument("--windows", type=int, default=None, help="use only the first N windows")
    p.add_argument("--tasks", nargs="*", action="extend", default=None,
                   help="lm-eval tasks or presets: austen (offline), paper, leaderboard")
    p.add_argument("--limit", type=int, default=None, help="first N docs per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    p.add_argument("--batch-size", type=int, default=1, help="perplexity windows per forward")
    p.add_argument("--task-batch-size", type=int, default=8, help="lm-eval batch size (requests lm-eval's own path scores at once)")
    p.add_argument("--dtype", default=None, help="float32|bfloat16|float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="default: this process's accelerator, else cpu")
    p.add_argument("--quant-forward", choices=M.QUANT_FORWARDS, default="auto",
                   help="kernels | dequantized (reference-kernel numbers, fast on CPU); auto: GPU kernels, CPU dequantized")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend BOS to task requests (default: as the tokenizer does)")
    p.add_argument("--local-docs", type=int, default=500, help="docs per local Austen task")
    p.add_argument("--revision", default=None, help="baseline hub revision")
    p.add_argument("--no-cache", action="store_true",
                   help="re-evaluate every model, even those whose results are cached for these settings")
    p.add_argument("-o", "--out", default=None, help="report directory (default: <first quant>/eval)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = args.out or os.path.join(args.quant[0], "eval")
    from tqdm.contrib.logging import logging_redirect_tqdm

    from wq.heap import keep_freed_memory
    keep_freed_memory()  # every forward re-allocates the same buffers: reuse them (wq/heap.py)

    try:  # evaluate() checks the task names and model paths before it loads anything
        with logging_redirect_tqdm():  # log lines above the progress bars, not inside them
            report = evaluate(
                args.quant, baseline=args.baseline, ppl=args.ppl if args.ppl is not None else ["austen"],
                tasks=args.tasks or (), seqlen=args.seqlen, windows=args.windows, limit=args.limit,
                batch_size=args.batch_size, task_batch_size=args.task_batch_size, dtype=args.dtype,
                device=args.device, quant_forward=args.quant_forward, add_bos=args.add_bos,
                num_fewshot=args.num_fewshot, local_docs=args.local_docs,
                revision=args.revision, cache=not args.no_cache, out=out,
            )
    except (UnknownTaskError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report is not None:
        print((Path(out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
