"""Streamed quantization: the memory a run needs does not grow with the model.

    python -m wq.quantize meta-llama/Llama-3.1-405B --scheme W4G128 --algo gptq -o out   # the CLI default
    wq.quantize_streamed("path/or/hub-id", "W4G128", "out", algo="gptq", calib="corpus.txt")

The model is built on the meta device (transformers' own modules, no weights); the tensors outside
the decoder blocks (embeddings, final norm, head) are loaded when needed (calibration: for capturing
the first block's inputs, then dropped until the end; rtn: at the end); each decoder block is read from
the safetensors shards when the pipeline reaches it (in fp32 on the compute device), quantized,
staged on disk in `<output>.partial/` (which --resume continues from) and released. At the end the
staged parts are converted into each requested format's directory, which appears complete or not at
all. Memory: the interpreter, about two blocks (one in fp32 while it is quantized), gptq's Hessians of
one block and the calibration stream; the outside tensors only while the first block's inputs are
captured and at the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS
from .api import CoverageError, LayerReport, QuantReport, quantize_linear_in_place
from .calib.distributed import is_main
from .calib.pipeline import _NOT_ALGO, Checkpoint, _names_in, clear_checkpoint, quantize_calibrated
from .io import atomic_dir, default_format
from .loading.shards import ShardReader
from .loading.skeleton import Skeleton
from .nn import DEFAULT_SKIP, materialize, plan_layers
from .nn.coverage import coverage
from .nn.surgery import linear_candidates
from .scheme import QuantScheme
from .writing.assemble import assemble, staged_parts
from .writing.output import refuse_occupied

log = logging.getLogger(__name__)


def quantize_streamed(source: str | Path | Skeleton, scheme: QuantScheme | str, output: str | Path, *, algo: str = "rtn",
                      calib=None, tokenizer=None, skip: Iterable[str] = DEFAULT_SKIP, override=None,
                      formats: list[str] | None = None, device: str | torch.device | None = None,
                      progress: bool = True, strict: bool = False, overwrite: bool = False, recipe=None,
                      extra: dict | None = None, resume: bool = False, **algo_args) -> dict:
    """Quantize the checkpoint at `source` (a directory or Hub id of safetensors shards) block by block and
    write `output` (one directory per format when several). Returns {"report", "dirs", "skeleton"}."""
    scheme = QuantScheme.parse(scheme)
    if scheme.is_cast:
        raise ValueError(f"{scheme} is a plain float cast, not a quantization: use the model-free cast")
    output = Path(output)
    refuse_occupied(output, overwrite)
    algorithm = ALGORITHMS.get(algo)(**{**algo_args, "output": str(output), "resume": resume})
    sk = source if isinstance(source, Skeleton) else Skeleton(ShardReader.open(source))
    model = sk.model
    shapes = linear_candidates(model)  # before any module changes: (in, out) of every quantizable name
    plan, skipped = plan_layers(model, scheme, skip=skip, override=override)
    if not plan:
        raise ValueError("no Linear layer left to quantize: check --skip / --override patterns")
    if algorithm.needs_calibration and any(s.is_fp8 for s in plan.values()):
        raise ValueError(f"FP8 layers are scaled casts and take no calibration; use --algo rtn with {scheme}")
    _check_formats(formats or [default_format(scheme)], plan)
    planned = coverage(model, plan, skipped)
    if strict and planned.warning():
        raise CoverageError(f"{planned.warning()}. Adjust --skip / --override, or drop --strict to write it anyway")
    log.info("streaming %s: %d decoder blocks of %.1f MiB each (%s), %d tensors in %d file(s)", sk.reader.path,
             len(sk), sk.block_bytes() / 2**20, sk.dtype, len(sk.reader.weight_map),
             len(set(sk.reader.weight_map.values())))
    report = QuantReport(scheme=str(scheme), algo=algo, skipped=skipped)
    if not algorithm.needs_calibration and not is_main():  # nothing to share out: rank 0 does it all
        log.info("%s takes no calibration data: this rank has nothing to do", algo)
        return {"report": report, "dirs": [], "skeleton": sk}
    t0 = time.perf_counter()
    if algorithm.needs_calibration:
        sk.load_outside("cpu")  # for capturing the first block's inputs; released while the blocks run
        quantize_calibrated(model, plan, algorithm, report, calib=calib, tokenizer=tokenizer, device=device,
                            progress=progress, source=sk)
    else:
        _data_free(sk, plan, algorithm, report, output, device=device, progress=progress, resume=resume)
    report.seconds = time.perf_counter() - t0
    cov = coverage(model, skipped=skipped)
    report.coverage = cov.to_dict()
    if cov.warning():
        log.warning("%s", cov.warning())
    quant = {"scheme": str(scheme), "algo": algo, "algo_args": algo_args,
             "layers": {n: str(s) for n, s in plan.items()}, "report": report.to_dict(), "coverage": report.coverage}
    sk.release_outside()  # staged on disk by now: the assembly reads them from there
    dirs: list[Path] = []
    if is_main():
        dirs = _write(sk, plan, shapes, quant, output, formats or [default_format(scheme)], tokenizer=tokenizer,
                      recipe=recipe, extra=extra)
        clear_checkpoint(output)
    return {"report": report, "dirs": dirs, "skeleton": sk}


def _check_formats(formats: list[str], plan) -> None:
    """Every requested format can store every planned scheme: fail before any work."""
    from .formats import FORMATS
    from .formats.fp8 import float_format_name

    for f in formats:
        for name, sch in plan.items():
            fmt = FORMATS.get(float_format_name(f, str(sch)))()
            reason = fmt.why_not(sch)
            if reason:
                raise ValueError(f"format {fmt.name!r} cannot store layer {name} ({sch}): {reason}")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Tokenizer files of the source checkpoint, copied as they are (no tokenizer library needed)."""
    import shutil

    for pattern in ("tokenizer*", "special_tokens_map.json", "*.model", "chat_template*", "vocab.*", "merges.txt"):
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)


def _data_free(sk: Skeleton, plan, algorithm, report: QuantReport, output: Path, *, device, progress: bool,
               resume: bool) -> None:
    """rtn / FP8, block by block: load, quantize each planned Linear, stage, release."""
    fp = {"algo": algorithm.name, "plan": {n: str(v) for n, v in plan.items()}, "blocks": len(sk),
          "settings": {k: v for k, v in sorted(algorithm.settings.items()) if k not in _NOT_ALGO}, "streamed": True}
    ckpt = Checkpoint(output, fp)
    state = ckpt.state() if resume else None
    start = 0
    if state is not None and state["fingerprint"] == ckpt.fingerprint:
        start = state["next_block"]
        report.layers.update({n: LayerReport(**r) for n, r in state["layers"].items()})
        log.info("resuming from block %d/%d (%s)", start, len(sk), ckpt.dir)
    else:
        if state is not None:
            log.warning("--resume: %s was made with other settings; starting over", ckpt.dir)
        ckpt.reset()
    bar = tqdm(range(start, len(sk)), desc=f"{algorithm.name} {report.scheme}", unit="block", disable=not progress,
               initial=start, total=len(sk))
    for i in bar:
        bname = sk.block_name(i)
        block = sk.load_block(i, device or "cpu")
        materialize(sk.model, plan, within=bname)
        for rel, scheme in _names_in(plan, bname).items():
            report.layers[f"{bname}.{rel}"] = quantize_linear_in_place(block, rel, scheme, algorithm, device)
        ckpt.save(i, block, [], {n: vars(r) for n, r in report.layers.items()}, done=i == len(sk) - 1)
        sk.release_block(i)
    sk.load_outside("cpu")  # not needed before: the blocks are quantized without any input
    for name, scheme in plan.items():  # outside the blocks (an overridden lm_head)
        if not name.startswith(sk.prefix + "."):
            report.layers[name] = quantize_linear_in_place(sk.model, name, scheme, algorithm, device)
    ckpt.save_outside(sk.model, sk.prefix)


def _write(sk: Skeleton, plan, shapes, quant: dict, output: Path, formats: list[str], *, tokenizer, recipe,
           extra) -> list[Path]:
    """Staged parts -> one directory per format, atomically (temp sibling, renamed at the end)."""
    from transformers import GenerationConfig

    from .formats.fp8 import float_format_name

    formats = list(dict.fromkeys(float_format_name(f, quant["scheme"]) for f in formats))
    staging = Path(str(output).rstrip("/") + ".partial")
    gen = None
    if (sk.reader.path / "generation_config.json").exists():
        try:
            gen = GenerationConfig.from_pretrained(sk.reader.path)
        except Exception as e:  # a broken generation config must not lose the checkpoint
            log.warning("generation_config not copied: %s", e)
    unquantized = [n for n, m in sk.model.named_modules() if isinstance(m, torch.nn.Linear) and n not in plan]
    with atomic_dir(output) as tmp:
        targets = {f: (tmp / f if len(formats) > 1 else tmp) for f in formats}
        assemble(list(staged_parts(staging, sk.prefix, len(sk))), targets, names=sk.names,
                 schemes={n: QuantScheme.parse(s) for n, s in quant["layers"].items()}, shapes=shapes,
                 config=sk.config.to_dict(), quant=quant, unquantized=unquantized, tokenizer=tokenizer,
                 generation_config=gen, recipe=recipe, extra=extra)
        for target in targets.values():
            if tokenizer is None:
                _copy_tokenizer(sk.reader.path, target)
            # sizes on disk: the source's tensors and what was written (recorded before the directory appears)
            meta_path = target / "wq.json"
            meta = json.loads(meta_path.read_text())
            meta["size_bytes"] = {"before": sk.reader.total_bytes(),
                                  "after": sum(f.stat().st_size for f in target.glob("*.safetensors"))}
            meta_path.write_text(json.dumps(meta, indent=2, default=str))
    return [output / f if len(formats) > 1 else output for f in formats]
