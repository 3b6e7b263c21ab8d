"""The CLI: python -m wq.quantize [MODEL] --scheme W4G128 [--algo rtn] -o OUT

Thin: flags -> QuantConfig -> load model -> wq.quantize_model -> wq.save -> summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .config import QuantConfig
from .scheme import QuantScheme

log = logging.getLogger("wq")

EPILOG = """\
examples:
  python -m wq.quantize --scheme W4G128 -o out/smollm2-w4g128            # bundled model, RTN
  python -m wq.quantize meta-llama/Llama-3.1-8B --scheme W3G128 --algo gptq -o out/l3-w3
  python -m wq.quantize ./my-model --scheme W2G128 --algo autoround --calib corpus.txt -o out/w2
  python -m wq.quantize --recipe configs/w4g128-gptq.yaml -o out/x --override 'down_proj=W8G128'

Settings come from the dataclass defaults, then --recipe, then flags. The output directory is
written atomically (temp dir, then rename): an interrupted run never leaves a complete-looking one.
"""


class UserError(Exception):
    """A problem with the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wq.quantize",
        description="Quantize a Hugging Face causal LM's Linear weights (weight-only) and save a checkpoint "
        "that transformers, vLLM and wq load.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    if cfg.bits_budget is not None:
        for c in cfg.bits_candidates:
            QuantScheme.parse(c)  # SchemeError shows the grammar
        if len(cfg.format) > 1:
            log.warning("--bits-budget counts the bits of the first --format (%s); the others may differ slightly",
                        cfg.format[0])
    if not cfg.output:
        raise UserError("no output directory: pass -o OUT")
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise UserError(f"output {cfg.output} exists; pass --overwrite to replace it, or choose another -o")
    if cfg.resume and not cfg.output:
        raise UserError("--resume needs the -o of the interrupted run")


def load_model(name: str | None, device: str | None):
    """Load a causal LM and its tokenizer from a hub id, a local dir, or the bundled default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .assets import resolve_model

    path = resolve_model(name)
    looks_local = path.startswith((".", "/", "~")) or os.path.sep in path and os.path.exists(os.path.dirname(path))
    if looks_local and not Path(path).expanduser().exists():
        raise UserError(f"model {path} not found: give an existing directory or a Hugging Face hub id")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    except OSError as e:
        raise UserError(f"cannot load model {path!r}: {e}. For a hub id you need network access (or a "
                        f"local copy); for a directory it must hold config.json and weights.") from None
    model.eval()
    if device:
        model.to(device)
    return model, tok, path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def summary_table(report, before: int, after: int, total_seconds: float, out_dirs) -> str:
    rows = [
        ("scheme / algorithm", f"{report.scheme} / {report.algo}"),
        ("layers quantized", str(len(report.layers))),
        ("layers skipped", f"{len(report.skipped)}" + (f" ({', '.join(list(report.skipped)[:3])}"
                                                       f"{', ...' if len(report.skipped) > 3 else ''})"
                                                       if report.skipped else "")),
        ("model size before", human_bytes(before)),
        ("model size after", f"{human_bytes(after)} ({before / max(after, 1):.2f}x smaller)"),
        ("mean relative weight error", f"{report.mean_error:.4f}"),
        ("worst layer", max(((n, r.error) for n, r in report.layers.items()), key=lambda x: x[1],
                            default=("-", 0.0))[0]),
        ("quantization time", f"{report.seconds:.1f} s"),
        ("total time", f"{total_seconds:.1f} s"),
        ("written", ", ".join(str(d) for d in out_dirs)),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k.ljust(width)} : {v}" for k, v in rows] + [line])


def run(cfg: QuantConfig, *, progress: bool = True) -> dict:
    """Quantize and save per `cfg`. Returns {"report", "dirs", "summary"}."""
    import wq

    t0 = time.perf_counter()
    validate(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, path = load_model(cfg.model, None)
    log.info("loaded %s (%s parameters)", path, f"{sum(p.numel() for p in model.parameters()):,}")
    before = model_bytes(model)
    if QuantScheme.parse(cfg.scheme).is_cast:
        return run_cast(cfg, model, tok, before, t0)
    calib = cfg.calib
    report = wq.quantize_model(
        model, cfg.scheme, algo=cfg.algo, calib=calib, tokenizer=tok, skip=cfg.skip, override=cfg.override,
        device=device if device != "cpu" else None, progress=progress, **_calib_args(cfg), **cfg.algo_args(),
        **cfg.model_args(),
    )
    after = model_bytes(model)
    dirs = wq.save(model, cfg.output, format=cfg.format or None, tokenizer=tok, config=cfg,
                   overwrite=cfg.overwrite, extra={"base_model": cfg.model or "SmolLM2-135M-Instruct (bundled)",
                                                   "size_bytes": {"before": before, "after": after}})
    from .calib import clear_checkpoint

    clear_checkpoint(cfg.output)  # the resume state of a calibrated run is no longer needed
    summary = summary_table(report, before, after, time.perf_counter() - t0, dirs)
    if model.wq_quant.get("bits_budget"):
        from .budget import budget_table

        summary += "\n" + budget_table(model.wq_quant["bits_budget"])
    return {"report": report, "dirs": dirs, "summary": summary, "model": model, "tokenizer": tok}


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
    from .scheme import SchemeError

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
        result = run(cfg, progress=args.progress)
    except (UserError, SchemeError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output directory (a calibrated run continues from its "
              "last finished block with the same flags plus --resume)", file=sys.stderr)
        return 130
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


if __name__ == "__main__":
    sys.exit(main())
