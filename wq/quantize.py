"""The CLI: python -m wq.quantize [MODEL] --scheme W4G128 [--algo rtn] -o OUT

Thin: flags -> QuantConfig -> load model -> wq.quantize_model -> wq.save -> summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .config import HelpFormatter, QuantConfig
from .errors import UserError
from .scheme import QuantScheme
from .writing.output import human_bytes

log = logging.getLogger("wq")

EPILOG = """\
examples:
  python -m wq.quantize --scheme W4G128 -o out/smollm2-w4g128            # bundled model, RTN
  python -m wq.quantize meta-llama/Llama-3.1-8B --scheme W3G128 --algo gptq -o out/l3-w3
  python -m wq.quantize ./my-model --scheme W2G128 --algo autoround --calib corpus.txt -o out/w2
  python -m wq.quantize --recipe configs/w4g128-gptq.yaml -o out/x --override 'down_proj=W8G128'

Settings come from the dataclass defaults, then --recipe, then flags. The output is checked before the
model loads (writable, room for the estimated size, not the working directory, not a directory wq did not
write) and written atomically (temp dir, then rename): an interrupted run never leaves a complete-looking
one, and --overwrite deletes the old checkpoint only after the new one is complete.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wq.quantize",
        description="Quantize a Hugging Face causal LM's Linear weights (weight-only) and save a checkpoint "
        "that transformers, vLLM and wq load.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face hub id or local directory; omit or 'default' for the bundled "
                   "SmolLM2-135M-Instruct (offline)")
    p.add_argument("--recipe", metavar="NAME|YAML", help="a YAML recipe of these settings, or a bundled one by "
                   "name: fast, balanced, best (configs/; docs/quality.md gives their cost); flags given on the "
                   "command line override it")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    QuantConfig.add_arguments(p)
    return p


def config_from_argv(argv: list[str] | None) -> tuple[QuantConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    base = None
    if args.recipe:
        from .config import resolve_recipe

        try:
            base = QuantConfig.from_yaml(resolve_recipe(args.recipe))
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    cfg = QuantConfig.from_args(args, base)
    if args.model is not None:
        cfg.model = args.model
    return cfg, args


def validate(cfg: QuantConfig) -> None:
    """Check everything that needs no model, before the (slow) model load."""
    from .algorithms import ALGORITHMS
    from .formats import FORMATS
    from .formats.fp8 import float_format_name
    from .nn import parse_overrides
    from .scheme import QuantScheme

    scheme = QuantScheme.parse(cfg.scheme)  # SchemeError shows the grammar
    try:
        ALGORITHMS.get(cfg.algo)
    except KeyError as e:
        raise UserError(f"--algo: {e.args[0]}") from None
    if scheme.is_cast and cfg.format:
        raise UserError(f"{scheme} writes a plain checkpoint; drop --format")
    for f in cfg.format:
        f = float_format_name(f, scheme)  # FP8: compressed-tensors -> its float-quantized flavour
        if f not in FORMATS:
            try:
                FORMATS.get(f)
            except KeyError as e:
                raise UserError(f"--format: {e.args[0]}") from None
        reason = FORMATS.get(f)().why_not(scheme)
        if reason:
            raise UserError(f"--format {f} cannot store {scheme}: {reason}")
    try:
        parse_overrides(cfg.override)
    except ValueError as e:
        raise UserError(str(e)) from None
    from .algorithms.awq import QUANTIZERS
    from .algorithms.recon import INITS

    if cfg.algo == "recon" and cfg.init not in INITS:
        raise UserError(f"--init {cfg.init}: choose one of {', '.join(INITS)}")
    if cfg.algo == "awq" and cfg.quantizer not in QUANTIZERS:
        raise UserError(f"--quantizer {cfg.quantizer}: choose one of {', '.join(QUANTIZERS)}")
    cast = [f for f, on in (("--rotate", cfg.rotate), ("--e2e-steps", bool(cfg.e2e_steps))) if on]
    if cast and cfg.bits_budget is None and QuantScheme.parse(cfg.scheme).is_cast:
        raise UserError(f"{' and '.join(cast)} with {cfg.scheme}: a float cast takes neither; give a W<bits>G<group> "
                        "scheme")
    if cfg.bits_budget is not None:
        for c in cfg.bits_candidates:
            QuantScheme.parse(c)  # SchemeError shows the grammar
        if len(cfg.format) > 1:
            log.warning("--bits-budget counts the bits of the first --format (%s); the others may differ slightly",
                        cfg.format[0])
    if not cfg.output:
        raise UserError("no output directory: pass -o OUT")
    from .loading.source import resolve_source
    from .writing.output import check_output

    if cfg.calib and ALGORITHMS.get(cfg.algo).needs_calibration:  # a mistyped file: now, not after the model loads
        from .loading.source import looks_like_path

        calib = Path(cfg.calib).expanduser()
        if not calib.exists() and (looks_like_path(cfg.calib) or calib.suffix in (".txt", ".jsonl", ".json")):
            raise UserError(f"--calib {cfg.calib}: no such file or directory (give a text file, a folder of them, or "
                            "a Hub dataset name)")
    where = dict(overwrite=cfg.overwrite, overwrite_non_checkpoint=cfg.overwrite_non_checkpoint)
    check_output(cfg.output, **where)  # the cheap checks first
    source = resolve_source(cfg.model)  # a missing path, broken shards or an unreachable Hub: one line, now
    check_output(cfg.output, **where, needed_bytes=needed_bytes(cfg, source.path),
                 protect=(source.path,) if source.local else (), reuse_partial=uses_partial(cfg))


def stages(cfg: QuantConfig) -> bool:
    """Streamed and model-free runs stage their finished parts in <out>.partial until the checkpoint is assembled."""
    from .algorithms import ALGORITHMS

    if QuantScheme.parse(cfg.scheme).is_cast:
        return False
    model_free = cfg.model_free and not ALGORITHMS.get(cfg.algo).needs_calibration and not cfg.resume
    return bool(cfg.stream or model_free)


def uses_partial(cfg: QuantConfig) -> bool:
    """The run writes <out>.partial (staging or a calibrated run's resume state), replacing or continuing it."""
    from .algorithms import ALGORITHMS

    return stages(cfg) or ALGORITHMS.get(cfg.algo).needs_calibration


def needed_bytes(cfg: QuantConfig, path: str) -> int | None:
    """Disk the run needs at its peak (wq.plan.sizes.peak_disk_bytes); None (no space check) when the model's
    config cannot be built on the meta device."""
    from .algorithms import ALGORITHMS
    from .plan.sizes import peak_disk_bytes

    algo = ALGORITHMS.get(cfg.algo)
    calib = (cfg.nsamples, cfg.seqlen, getattr(algo, "granularity", "") == "block") if algo.needs_calibration else None
    staged = stages(cfg) and not in_memory_reason(cfg)
    try:
        return peak_disk_bytes(path, cfg.scheme, skip=cfg.skip, override=cfg.override,
                               formats=max(1, len(cfg.format)), calibration=calib, staged=staged)
    except UserError:
        raise
    except Exception as e:  # e.g. an architecture transformers cannot build from its config alone
        log.warning("could not estimate the checkpoint size (%s: %s); free space is not checked", type(e).__name__, e)
        return None


def in_memory_reason(cfg: QuantConfig) -> str | None:
    """Why this run needs the whole model in memory (the streamed and model-free paths see one block, or one
    tensor, at a time), or None. AWQ and recon change only their own block, so they stream."""
    why = {"--rotate": "rotation touches the embeddings, every block and the head",
           "--bits-budget": "the sensitivity measurement backpropagates through the whole model",
           "--e2e-steps": "end-to-end scale tuning runs the whole model"}
    on = [f for f, set_ in (("--rotate", cfg.rotate), ("--bits-budget", cfg.bits_budget is not None),
                            ("--e2e-steps", bool(cfg.e2e_steps))) if set_]
    return "; ".join(f"{f}: {why[f]}" for f in on) or None


def tokenizer_reason(cfg: QuantConfig) -> str | None:
    """Why this run needs the model's tokenizer (rtn and FP8 need none), or None."""
    from .algorithms import ALGORITHMS

    if ALGORITHMS.get(cfg.algo).needs_calibration:
        return f"--algo {cfg.algo} calibrates on text"
    if cfg.bits_budget is not None or cfg.e2e_steps:
        return f"{'--bits-budget' if cfg.bits_budget is not None else '--e2e-steps'} runs calibration text through the model"
    if QuantScheme.parse(cfg.scheme).fmt == "fp16":
        return "the FP16 audit runs text through the model"
    if cfg.eval:
        return "--eval runs text through the model"
    return None


def load_model(name: str | None, device: str | None, *, tokenizer_needed: str | None = "text"):
    """Load a causal LM and its tokenizer from a hub id, a local dir, or the bundled default. tokenizer_needed: why
    the run needs a tokenizer, or None when it can go without (then a model without one loads with tok None)."""
    from transformers import AutoModelForCausalLM

    from .loading.source import load_tokenizer, resolve_source

    source = resolve_source(name)  # checks the path, the shards' headers, the Hub's reachability
    path = source.path
    tok = load_tokenizer(source, required=tokenizer_needed is not None,
                         why=f" ({tokenizer_needed})" if tokenizer_needed else "")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    except OSError as e:
        raise UserError(f"cannot load model {path!r}: {e}. For a hub id you need network access (or a "
                        f"local copy); for a directory it must hold config.json and weights.") from None
    model.eval()
    if device:
        model.to(device)
    return model, tok, path


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def objective_rows(report) -> list[tuple[str, str]]:
    """The error a calibrated algorithm minimises, next to round-to-nearest's: gptq lowers the layer's output error
    and may raise the weight error above rtn's, which alone would read like a regression."""
    stats = [r.stats for r in report.layers.values()]
    out = [s["output_error"] for s in stats if "output_error" in s and "rtn_output_error" in s]
    if out:
        rtn = [s["rtn_output_error"] for s in stats if "output_error" in s and "rtn_output_error" in s]
        mean, mean_rtn = sum(out) / len(out), sum(rtn) / len(rtn)
        return [("mean relative output error", f"{mean:.4f} (rtn on the same inputs: {mean_rtn:.4f}; what "
                 f"{report.algo} minimises, on the calibration data)")]
    ratios = [s["loss"] / s["rtn_loss"] for s in stats if s.get("rtn_loss") and "loss" in s]
    if ratios:
        return [("block output loss", f"{sum(ratios) / len(ratios):.3f}x rtn's on the same blocks (what "
                 f"{report.algo} minimises)")]
    return []


def summary_table(report, before: int, after: int, total_seconds: float, out_dirs) -> str:
    cov = report.coverage or {}
    rows = [
        ("scheme / algorithm", f"{report.scheme} / {report.algo}"),
        ("layers quantized", str(len(report.layers))),
        ("weights quantized", f"{cov.get('blocks_share', 1.0):.1%} of the decoder blocks', "
                              f"{cov.get('model_share', 1.0):.1%} of the model's (embeddings/head included)"),
        ("layers skipped", f"{len(report.skipped)}" + (f" ({', '.join(list(report.skipped)[:3])}"
                                                       f"{', ...' if len(report.skipped) > 3 else ''})"
                                                       if report.skipped else "")),
        ("model size before", human_bytes(before)),
        ("model size after", f"{human_bytes(after)} ({before / max(after, 1):.2f}x smaller)"),
        ("mean relative weight error", f"{report.mean_error:.4f}"),
        *objective_rows(report),
        ("worst layer", max(((n, r.error) for n, r in report.layers.items()), key=lambda x: x[1],
                            default=("-", 0.0))[0]),
        ("quantization time", f"{report.seconds:.1f} s"),
        ("total time", f"{total_seconds:.1f} s"),
        ("written", ", ".join(str(d) for d in out_dirs)),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    table = "\n".join([line] + [f"{k.ljust(width)} : {v}" for k, v in rows] + [line])
    if cov:
        from .nn.coverage import KINDS

        by_kind = [f"  {k}: {cov[k]['quantized']:,} quantized, {cov[k]['kept']:,} kept" for k in KINDS
                   if cov.get(k) and cov[k]["quantized"] + cov[k]["kept"]]
        table += "\nweights by kind (matrix elements):\n" + "\n".join(by_kind)
        if cov.get("blocks_share", 1.0) < 0.99:
            table += (f"\nWARNING: {1 - cov['blocks_share']:.1%} of the decoder blocks' weights are NOT quantized "
                      f"(see wq.json coverage.kept_in_blocks; --strict makes this an error)")
    return table


def run(cfg: QuantConfig, *, progress: bool = True) -> dict:
    """Quantize and save per `cfg`. Returns {"report", "dirs", "summary"}."""
    import wq

    t0 = time.perf_counter()
    validate(cfg)
    if cfg.low_mem:
        from .heap import return_freed_memory

        return_freed_memory()  # large tensors get their own mappings, returned when freed (wq/heap.py)
    from .calib.distributed import init_from_env, is_main

    device = init_from_env(cfg.device) or ("cuda" if torch.cuda.is_available() else "cpu")  # torchrun: join
    whole = in_memory_reason(cfg)
    if whole and (cfg.stream or cfg.model_free):
        log.info("loading the model whole (as --no-stream): %s", whole)
    if cfg.model_free and is_main() and not whole:
        done = run_model_free(cfg, progress=progress, t0=t0)
        if done is not None:
            return done
    if cfg.stream and not whole and not QuantScheme.parse(cfg.scheme).is_cast:
        from .loading.shards import ShardError
        from .loading.skeleton import StreamError

        try:
            return run_streamed(cfg, device, progress=progress, t0=t0)
        except (StreamError, ShardError) as e:
            if cfg.resume:
                raise UserError(f"cannot stream this model ({e}); a streamed --resume needs the same source") from None
            log.warning("cannot stream this model block by block (%s); loading it whole instead", e)
    model, tok, path = load_model(cfg.model, None, tokenizer_needed=tokenizer_reason(cfg))
    log.info("loaded %s (%s parameters)", path, f"{sum(p.numel() for p in model.parameters()):,}")
    before = model_bytes(model)
    if QuantScheme.parse(cfg.scheme).is_cast:
        return run_cast(cfg, model, tok, before, t0)
    calib = cfg.calib
    report = wq.quantize_model(
        model, cfg.scheme, algo=cfg.algo, calib=calib, tokenizer=tok, skip=cfg.skip, override=cfg.override,
        device=device if device != "cpu" else None, progress=progress, strict=cfg.strict, **_calib_args(cfg),
        **cfg.algo_args(), **cfg.model_args(),
    )
    after = model_bytes(model)
    dirs = []
    if is_main():  # under torchrun every rank calibrated its share; one writes
        dirs = wq.save(model, cfg.output, format=cfg.format or None, tokenizer=tok, config=cfg,
                       overwrite=cfg.overwrite, extra={"base_model": cfg.model or "SmolLM2-135M-Instruct (bundled)",
                                                       "size_bytes": {"before": before, "after": after}})
    from .calib import clear_checkpoint

    if is_main():
        clear_checkpoint(cfg.output)  # the resume state of a calibrated run is no longer needed
    summary = summary_table(report, before, after, time.perf_counter() - t0, dirs)
    if model.wq_quant.get("bits_budget"):
        from .budget import budget_table

        summary += "\n" + budget_table(model.wq_quant["bits_budget"])
    return {"report": report, "dirs": dirs, "summary": summary, "model": model, "tokenizer": tok}


def run_model_free(cfg: QuantConfig, *, progress: bool, t0: float) -> dict | None:
    """rtn / FP8 / casts tensor by tensor (wq.model_free) when the run allows it; None: take another path."""
    from .algorithms import ALGORITHMS
    from .assets import resolve_model
    from .loading.shards import ShardError, ShardReader
    from .model_free import ModelFreeError, cast_model_free, check, quantize_model_free
    from .plan.memory import available_bytes

    scheme = QuantScheme.parse(cfg.scheme)
    if ALGORITHMS.get(cfg.algo).needs_calibration or cfg.resume:
        return None
    path = resolve_model(cfg.model)
    if not Path(path).expanduser().is_dir():
        return None  # a Hub id: the streamed path downloads it
    try:
        reader = ShardReader(Path(path).expanduser())
        if scheme.is_cast:
            avail = available_bytes()
            if scheme.fmt == "fp16" and (avail is None or reader.total_bytes() * 3 < avail):
                return None  # fits: the in-memory path audits the activations too
            if scheme.fmt == "fp16":
                log.warning("the model does not fit in memory for the FP16 activation audit: casting tensor by tensor "
                            "with the weight audit only")
            res = cast_model_free(reader, scheme, cfg.output, force=cfg.force, overwrite=cfg.overwrite,
                                  progress=progress, recipe=cfg)
            summary = (f"{scheme}: plain checkpoint {res['dirs'][0]} (model-free, "
                       f"{res['report']['convert_seconds']:.1f} s); total {time.perf_counter() - t0:.1f} s")
            return {"report": res["report"], "dirs": res["dirs"], "summary": summary, "model": None, "tokenizer": None}
        check(reader)
    except (ShardError, ModelFreeError) as e:
        log.info("not model-free (%s): loading the model block by block instead", e)
        return None
    log.info("model-free %s: tensor by tensor through %s", scheme, reader.path)
    res = quantize_model_free(reader, scheme, cfg.output, skip=cfg.skip, override=cfg.override,
                              formats=cfg.format or None, overwrite=cfg.overwrite, progress=progress, recipe=cfg,
                              strict=cfg.strict, extra={"base_model": cfg.model or "SmolLM2-135M-Instruct (bundled)"},
                              mse=cfg.mse)
    dirs = res["dirs"]
    sizes = json.loads((Path(dirs[0]) / "wq.json").read_text()).get("size_bytes", {})
    summary = summary_table(res["report"], sizes.get("before", 0), sizes.get("after", 0), time.perf_counter() - t0,
                            dirs)
    return {"report": res["report"], "dirs": dirs, "summary": summary, "model": None, "tokenizer": None}


def streamed_mmap_threshold(algo, low_mem: bool) -> int | None:
    """The glibc mmap threshold a streamed run pins (wq.heap.return_freed_memory), or None for glibc's own.

    One block at a time, what a block frees should go back to the OS, not into a heap that fragments. Layer
    algorithms (gptq): 1 MiB, every larger tensor its own mapping (8-block gptq 450 -> 315 MiB over the
    baseline, about +10% CPU). Block algorithms that train (autoround) allocate ~4 MiB blocks of a Linear
    every step: 8 MiB keeps those in the heap and maps the activations and the block's larger tensors (8-block
    autoround 756 -> 541 MiB over the baseline, CPU +2% in a paired A/B on 2 blocks, docs/streaming.md);
    --low-mem pins 1 MiB for every algorithm (set before this). Data-free runs: glibc's own."""
    if low_mem:
        return 1 << 20
    if not algo.needs_calibration:
        return None
    return 1 << 20 if getattr(algo, "granularity", "layer") == "layer" else 8 << 20


def run_streamed(cfg: QuantConfig, device: str, *, progress: bool, t0: float) -> dict:
    """The default path: the model read block by block from its shards (wq.stream), memory estimated first."""
    from .algorithms import ALGORITHMS
    from .loading.shards import ShardReader
    from .loading.skeleton import Skeleton
    from .loading.source import load_tokenizer, resolve_source
    from .nn import plan_layers
    from .plan.memory import backward_intermediates, estimate_streamed, training_footprint
    from .stream import quantize_streamed

    source = resolve_source(cfg.model)  # a missing path, broken shards or an unreachable Hub: one line
    sk = Skeleton(ShardReader.open(source.path))
    algo = ALGORITHMS.get(cfg.algo)
    calibrated = algo.needs_calibration
    threshold = streamed_mmap_threshold(algo, cfg.low_mem)
    if threshold:
        from .heap import return_freed_memory

        return_freed_memory(threshold)
    plan, _ = plan_layers(sk.model, cfg.scheme, skip=cfg.skip, override=cfg.override)
    from .calib.distributed import rank_world

    ranks = rank_world()[1]
    state, at_once = training_footprint(algo, ranks=ranks, low_mem=cfg.low_mem, batch_size=cfg.batch_size,
                                        seqlen=cfg.seqlen)
    est = estimate_streamed(sk, plan, calibrated=calibrated, block_algo=getattr(algo, "granularity", "") == "block",
                            nsamples=cfg.nsamples, seqlen=cfg.seqlen, processes=ranks, low_mem=cfg.low_mem,
                            device=device, hessian_budget=int(cfg.hessian_budget * 2**30),
                            reads_16bit=getattr(algo, "reads_16bit_weights", False),
                            state_per_weight=state, batch_size=at_once,
                            backward_widest=backward_intermediates(algo, low_mem=cfg.low_mem))
    log.info("%s", est.table())
    if not est.fits:
        if not cfg.force:
            raise UserError(est.advice() + " (or --force to try anyway)")
        log.warning("%s; going on (--force)", est.advice())
    tok = None
    if calibrated:  # data-free runs copy the tokenizer files, if any, and need none loaded
        tok = load_tokenizer(source, required=True, why=f" ({tokenizer_reason(cfg)})")
    before = sk.reader.total_bytes()
    settings = {**_calib_args(cfg), **cfg.algo_args()}
    settings.pop("output", None)
    settings.pop("resume", None)
    resume = cfg.resume
    if calibrated:
        settings["hessian_budget"] = int(cfg.hessian_budget * 2**30)
    result = quantize_streamed(
        sk, cfg.scheme, cfg.output, algo=cfg.algo, calib=cfg.calib, tokenizer=tok, skip=cfg.skip,
        override=cfg.override, formats=cfg.format or None, device=device if device != "cpu" else None,
        progress=progress, strict=cfg.strict, overwrite=cfg.overwrite, recipe=cfg, resume=resume,
        extra={"base_model": cfg.model or "SmolLM2-135M-Instruct (bundled)", "streamed": True}, **settings)
    dirs = result["dirs"]
    sizes = json.loads((Path(dirs[0]) / "wq.json").read_text()).get("size_bytes", {}) if dirs else {}
    before, after = sizes.get("before", before), sizes.get("after", 0)
    summary = summary_table(result["report"], before, after, time.perf_counter() - t0, dirs)
    return {"report": result["report"], "dirs": dirs, "summary": summary, "model": None, "tokenizer": tok}


def run_cast(cfg: QuantConfig, model, tok, before: int, t0: float) -> dict:
    """BF16/FP16: audit (FP16), convert, save a plain checkpoint. The audit is printed and saved."""
    import wq

    from .assets import load_book
    from .cast import calib_ids

    calib = None
    if QuantScheme.parse(cfg.scheme).fmt == "fp16":
        # a short pass is enough to find overflowing activations: at most 32 windows of at most 512 tokens
        text = load_book("emma") if cfg.calib is None else Path(cfg.calib).read_text()
        calib = calib_ids(tok, text, min(cfg.nsamples, 32), min(cfg.seqlen, 512))
    try:
        audit = wq.cast_model(model, cfg.scheme, calib=calib, force=cfg.force)
    except ValueError as e:  # Fp16OverflowError: the message names the layers and the fix
        raise UserError(str(e)) from None
    if audit is not None:
        print(audit.table())
    dirs = wq.save(model, cfg.output, tokenizer=tok, config=cfg, overwrite=cfg.overwrite,
                   extra={"base_model": cfg.model or "SmolLM2-135M-Instruct (bundled)",
                          "size_bytes": {"before": before, "after": model_bytes(model)}})
    after = model_bytes(model)
    summary = (f"{cfg.scheme}: plain checkpoint {dirs[0]} ({human_bytes(after)}, was {human_bytes(before)}); "
               f"conversion {model.wq_quant['report']['convert_seconds']:.3f} s; total "
               f"{time.perf_counter() - t0:.1f} s" + (f"; audit in {dirs[0]}/fp16_audit.json" if audit else ""))
    return {"report": audit, "dirs": dirs, "summary": summary, "model": model, "tokenizer": tok}


def run_eval(cfg: QuantConfig, result: dict) -> str:
    """--eval: perplexity (and --eval-tasks) of the fresh checkpoint next to the unquantized model, one run.

    Writes OUT/eval/report.{json,md,png} and copies the report into wq.json under "eval".
    Returns a short summary line.
    """
    from eval.run import evaluate

    from .assets import DEFAULT_MODEL

    target = Path(result["dirs"][0])
    bundled = cfg.model in (None, "", DEFAULT_MODEL)
    datasets = cfg.eval_ppl or (["austen"] if bundled else ["wikitext2"])
    report = evaluate(str(target), baseline=cfg.model or DEFAULT_MODEL, ppl=datasets, tasks=cfg.eval_tasks,
                      seqlen=cfg.eval_seqlen, windows=cfg.eval_windows, out=target / "eval")
    if report is None:  # not rank 0
        return ""
    meta_path = target / "wq.json"
    meta = json.loads(meta_path.read_text())
    meta["eval"] = report
    tmp = meta_path.with_name(".wq.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, meta_path)  # never a half-written wq.json
    lines = []
    name = next(m for m in report["models"] if m != "baseline")
    for ds, base in report["baseline"]["ppl"].items():
        q = report[name]["ppl"][ds]
        lines.append(f"{ds} ppl (seqlen {base['seqlen']}): baseline {base['ppl']:.3f} -> {name} {q['ppl']:.3f} "
                     f"({(q['ppl'] / base['ppl'] - 1) * 100:+.1f}%)")
    return "\n".join(lines + [f"eval report: {target / 'eval' / 'report.md'}"])


def _calib_args(cfg: QuantConfig) -> dict:
    """Calibration settings, passed only to calibrated algorithms."""
    from .algorithms import ALGORITHMS

    if not ALGORITHMS.get(cfg.algo).needs_calibration:  # --bits-budget / --e2e-steps still use nsamples x seqlen
        return {"nsamples": cfg.nsamples, "seqlen": cfg.seqlen} if cfg.bits_budget is not None or cfg.e2e_steps else {}
    return {"nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "batch_size": cfg.batch_size,
            "low_mem": cfg.low_mem, "resume": cfg.resume, "output": cfg.output}


def main(argv: list[str] | None = None) -> int:
    from .api import CoverageError
    from .scheme import SchemeError
    from .writing.output import is_environment_error

    cfg = None
    try:
        cfg, args = config_from_argv(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        if cfg.eval and cfg.eval_tasks:  # a misspelt task fails now, not after the quantization and perplexity
            from eval.tasks import UnknownTaskError, check_tasks

            try:
                check_tasks(cfg.eval_tasks)
            except UnknownTaskError as e:
                raise UserError(f"--eval-tasks: {e}") from None
        from tqdm.contrib.logging import logging_redirect_tqdm

        with _transformers_progress(args.progress), logging_redirect_tqdm():  # log lines above the bars, not in them
            result = run(cfg, progress=args.progress)
    except (UserError, SchemeError, FileExistsError, FileNotFoundError, CoverageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {_note(cfg)}", file=sys.stderr)
        return 130
    except Exception as e:  # the machine failed late (disk full, permissions, memory): one line, what was kept
        if cfg is None or not is_environment_error(e):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {type(e).__name__}: {msg}; {_note(cfg)}", file=sys.stderr)
        return 1
    from .calib.distributed import is_main

    if not is_main():  # the other ranks of a torchrun have nothing to report (rank 0 wrote the checkpoint)
        return 0
    print(result["summary"])
    if cfg.eval:
        print(run_eval(cfg, result))
    if cfg.push_to_hub:  # last, so the card sees everything the run wrote (eval included)
        from .hub import HubPushError, push_to_hub

        try:
            print(push_to_hub(cfg.output, cfg.push_to_hub, private=cfg.private, revision=cfg.revision))
        except HubPushError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


@contextlib.contextmanager
def _transformers_progress(enabled: bool):
    """--no-progress hides transformers' own bars (loading weights) too, for this run only."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


def _note(cfg: QuantConfig | None) -> str:
    """What a failed or interrupted run kept and how to continue it."""
    from .algorithms import ALGORITHMS
    from .writing.output import failure_note

    if cfg is None:
        return "nothing was written"
    calibrated = cfg.algo in ALGORITHMS and ALGORITHMS.get(cfg.algo).needs_calibration
    return failure_note(cfg.output, resumable=calibrated or cfg.stream)


if __name__ == "__main__":
    sys.exit(main())
