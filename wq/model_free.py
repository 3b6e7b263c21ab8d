"""Data-free schemes without a model: rtn and FP8 weights, and the FP16 cast, tensor by tensor through the
shards. No transformers model object at all, so any architecture whose Linear weights are named as
usual works, and the run is limited by disk and the quantization math, not by memory.

    python -m wq.quantize huge-model --scheme W4G128 -o out       # rtn: this path, whenever it applies
    wq.quantize_model_free("dir-or-hub-id", "W4G128", "out")

Which tensors are Linear weights, by name and shape alone: two-dimensional `<module>.weight` tensors
inside the decoder blocks (`...layers.N.`, `h.N.`, `blocks.N.`), plus `lm_head` when an override asks
for it; the same --skip / --override patterns as the model path (routers and lm_head skipped by
default). What that rule cannot see, the run refuses rather than guesses (the CLI then takes the
streamed model path): GPT-2-style Conv1D weights (stored transposed) and fused 3-D MoE expert tensors.

Weights are read one at a time, quantized (or cast) and staged per source shard, each written to disk
as it is made (every other tensor is copied file to file without being read into memory); the staged
parts are then written in each requested format, one layer in memory at a time.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS
from .api import LayerReport, QuantReport
from .fp8 import fp8_result
from .heap import Trimmer
from .io import atomic_dir, default_format
from .loading.shards import ShardReader
from .nn.coverage import Coverage, weight_kind
from .nn.surgery import DEFAULT_SKIP, compile_pattern, decide, parse_overrides
from .scheme import QuantScheme
from .writing.assemble import assemble
from .writing.output import refuse_occupied
from .writing.shards import ShardWriter

log = logging.getLogger(__name__)

BLOCK = re.compile(r"^(.*?\.)?(layers|h|blocks|block|decoder_layers)\.\d+\.")
EMBED = re.compile(r"(^|\.)(embed\w*|wte|wpe|word_embeddings|position_embeddings)(\.|$)")
CONV1D_MODEL_TYPES = {"gpt2", "imagegpt", "decision_transformer"}  # transformers' Conv1D users: weights [in, out]


class ModelFreeError(ValueError):
    """This checkpoint needs the model's code to be quantized right (the message says why)."""


class _SameNames:
    """Checkpoint names are the names: nothing to map."""

    @staticmethod
    def to_hub(key: str) -> str:
        return key

    @staticmethod
    def hub_module(name: str) -> str:
        return name


def check(reader: ShardReader) -> None:
    """Raise ModelFreeError when name-and-shape rules cannot tell this checkpoint's Linear weights."""
    mt = reader.config.get("model_type")
    if mt in CONV1D_MODEL_TYPES:
        raise ModelFreeError(f"{mt} stores its Linear weights transposed (Conv1D): the model's code is needed")
    fused = [n for n in reader.names() if len(reader.shape(n)) == 3 and "expert" in n]
    if fused:
        raise ModelFreeError(f"fused 3-D expert tensors (e.g. {fused[0]}): their layout needs the model's code")


def plan_tensors(reader: ShardReader, scheme: QuantScheme | str, *, skip: Iterable[str] = DEFAULT_SKIP,
                 override=None) -> tuple[dict[str, QuantScheme], dict[str, str]]:
    """({module name: scheme}, {module name: why kept}) over the checkpoint's Linear-shaped weights."""
    scheme = QuantScheme.parse(scheme)
    overrides = parse_overrides(override)
    skips = [(p, compile_pattern(p)) for p in skip]
    plan, skipped = {}, {}
    for name in reader.names():
        if not name.endswith(".weight") or len(reader.shape(name)) != 2:
            continue
        module = name[: -len(".weight")]
        if EMBED.search(module):
            continue
        in_block = BLOCK.match(module) is not None
        overridden = any(re.search(p, module) for p in overrides)
        if not in_block and not overridden and not re.search(r"(^|\.)lm_head$", module):
            continue  # outside the blocks only the head is a candidate, and only when overridden
        chosen, why = decide(module, scheme, overrides, skips)
        if chosen is None:
            skipped[module] = why
        else:
            plan[module] = chosen
    cfg = reader.config.get("text_config") or reader.config
    if "lm_head.weight" not in reader.weight_map and cfg.get("tie_word_embeddings", reader.config.get(
            "tie_word_embeddings", False)):
        skipped["lm_head"] = "tied to the input embedding (kept, as the embedding)"
    return plan, skipped


def _coverage(reader: ShardReader, plan: dict, skipped: dict) -> Coverage:
    cov = Coverage()
    for name in reader.names():
        shape = reader.shape(name)
        if len(shape) < 2:
            continue
        module = name.rpartition(".")[0]
        numel = 1
        for d in shape:
            numel *= d
        q = module in plan and name.endswith(".weight")
        cov.by_kind[weight_kind(module)]["quantized" if q else "kept"] += numel
        if BLOCK.match(name):
            if q:
                cov.block_quantized += numel
            else:
                cov.block_kept += numel
                cov.kept_in_blocks[name] = skipped.get(module, "not a Linear weight by its name and shape")
    return cov


def quantize_model_free(source: str | Path, scheme: QuantScheme | str, output: str | Path, *, skip=DEFAULT_SKIP,
                        override=None, formats: list[str] | None = None, overwrite: bool = False, progress: bool = True,
                        recipe=None, extra: dict | None = None, strict: bool = False, **algo_args) -> dict:
    """rtn / FP8 of `source`'s Linear weights, tensor by tensor. Returns {"report", "dirs"}."""
    from .api import CoverageError
    from .formats.fp8 import float_format_name

    scheme = QuantScheme.parse(scheme)
    if scheme.is_cast:
        raise ValueError(f"{scheme}: use cast_model_free")
    output = Path(output)
    refuse_occupied(output, overwrite)
    reader = source if isinstance(source, ShardReader) else ShardReader.open(source)
    check(reader)
    plan, skipped = plan_tensors(reader, scheme, skip=skip, override=override)
    if not plan:
        raise ValueError("no Linear weight left to quantize: check --skip / --override patterns")
    cov = _coverage(reader, plan, skipped)
    if strict and cov.warning():
        raise CoverageError(f"{cov.warning()}. Adjust --skip / --override, or drop --strict to write it anyway")
    formats = list(dict.fromkeys(float_format_name(f, str(scheme)) for f in (formats or [default_format(scheme)])))
    algorithm = ALGORITHMS.get("rtn")(**algo_args)
    report = QuantReport(scheme=str(scheme), algo="rtn", skipped=skipped)
    staging = Path(str(output).rstrip("/") + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:  # nothing here is resumable: a failure (full disk, Ctrl-C) leaves no staged parts behind
        files = sorted(set(reader.weight_map.values()))
        by_file: dict[str, list[str]] = {f: [] for f in files}
        for n in reader.names():
            by_file[reader.file_of(n)].append(n)
        parts, summaries, shapes = [], {}, {}
        t0 = time.perf_counter()
        bar = tqdm(total=len(reader.names()), desc=f"rtn {scheme} (model-free)", unit="tensor", disable=not progress)
        trimmer = Trimmer()  # the freed heap goes back to the OS as we go (wq/heap.py: RSS grew shard by shard)
        for i, f in enumerate(files):
            part = staging / f"part_{i:05d}"
            part.mkdir()
            staged = ShardWriter(part, max_bytes=2**62)  # one file per source shard, written tensor by tensor
            for name in by_file[f]:
                module = name.rpartition(".")[0]
                if module in plan and name.endswith(".weight"):
                    t = reader.get(name)
                    sch = plan[module]
                    t1 = time.perf_counter()
                    res = fp8_result(t, sch, name=module) if sch.is_fp8 else algorithm.quantize_weight(t, sch)
                    pw = res.packed
                    shapes[module] = (pw.in_features, pw.out_features)
                    tensors = ({"weight": pw.weight, "weight_scale": pw.scale} if sch.is_fp8 else
                               {"qweight": pw.qweight, "scales": pw.scales, "zeros": pw.zeros})
                    staged.add_many({f"{module}.{k}": v for k, v in tensors.items()})
                    summaries[module] = pw.summary()
                    report.layers[module] = LayerReport(scheme=str(sch), error=res.error, seconds=time.perf_counter() - t1,
                                                        bytes_before=t.numel() * t.element_size(),
                                                        bytes_after=pw.nbytes(), stats=res.stats)
                else:  # copied file to file, never in memory (embeddings); biases keep their own name too
                    st = reader.stored(name)  # None for FP8 block-scaled tensors: they are dequantized on read
                    t = st if st is not None else reader.get(name)
                    staged.add(name, t)
                bar.update(1)
                trimmer.tick(t.numel() * t.element_size())
                del t
            parts.append(("", part / staged.close()[0]))
            reader.close_file(f)  # done with this source shard
        bar.close()
        report.seconds = time.perf_counter() - t0
        report.coverage = cov.to_dict()
        if cov.warning():
            log.warning("%s", cov.warning())
        config = {k: v for k, v in reader.config.items() if k != "quantization_config"}
        quant = {"scheme": str(scheme), "algo": "rtn", "algo_args": algo_args, "layers": {n: str(s) for n, s in plan.items()},
                 "report": report.to_dict(), "coverage": report.coverage}
        with atomic_dir(output) as tmp:
            targets = {fm: (tmp / fm if len(formats) > 1 else tmp) for fm in formats}
            assemble(parts, targets, names=_SameNames(), schemes=plan, shapes=shapes, config=config, quant=quant,
                     unquantized=sorted(skipped), recipe=recipe, summaries=summaries,
                     extra={**(extra or {}), "model_free": True})
            for target in targets.values():
                _copy_side_files(reader.path, target)
                meta = json.loads((target / "wq.json").read_text())
                meta["size_bytes"] = {"before": reader.total_bytes(),
                                      "after": sum(p.stat().st_size for p in target.glob("*.safetensors"))}
                (target / "wq.json").write_text(json.dumps(meta, indent=2, default=str))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"report": report, "dirs": [output / fm if len(formats) > 1 else output for fm in formats]}


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer and generation config of the source, as they are."""
    for pattern in ("tokenizer*", "special_tokens_map.json", "*.model", "chat_template*", "vocab.*", "merges.txt",
                    "generation_config.json"):
        for f in src.glob(pattern):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)


def cast_model_free(source: str | Path, scheme: QuantScheme | str, output: str | Path, *, force: bool = False,
                    overwrite: bool = False, progress: bool = True, recipe=None, extra: dict | None = None) -> dict:
    """BF16 / FP16 cast, tensor by tensor, with the weight part of the FP16 audit (no model, so no
    activations: the audit file says so). Fp16OverflowError when a weight would become inf, unless force."""
    from .fp16_audit import Fp16OverflowError, cast_stats, total
    from .writing.checkpoint import WQ_JSON, wq_meta
    scheme = QuantScheme.parse(scheme)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[scheme.fmt]
    output = Path(output)
    refuse_occupied(output, overwrite)
    reader = source if isinstance(source, ShardReader) else ShardReader.open(source)
    stats, t0 = {}, time.perf_counter()
    with atomic_dir(output) as tmp:
        writer = ShardWriter(tmp)
        for name in tqdm(reader.names(), desc=f"{scheme} (model-free)", unit="tensor", disable=not progress):
            t = reader.get(name)
            if t.is_floating_point() and t.dtype != dtype:
                if dtype == torch.float16:
                    stats[name] = cast_stats(t, dtype)
                t = t.to(dtype)
            writer.add(name, t)
        bad = {n: s for n, s in stats.items() if s.overflow}
        if bad and not force:
            raise Fp16OverflowError(f"{len(bad)} weight tensor(s) would become inf in FP16 (e.g. {next(iter(bad))}: "
                                    f"{bad[next(iter(bad))].overflow} values); keep BF16, or --force to write anyway")
        writer.close()
        config = {k: v for k, v in reader.config.items() if k != "quantization_config"}
        config["dtype"] = config["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _copy_side_files(reader.path, tmp)
        seconds = time.perf_counter() - t0
        report = {"convert_seconds": round(seconds, 4), "model_free": True}
        if dtype == torch.float16:
            tot = total(stats) if stats else None
            audit = {"weights": {n: vars(s) for n, s in stats.items()},
                     "weights_total": vars(tot) if tot else None, "ok": not bad,
                     "activations": "not audited: a model-free run has no forward pass (run with --no-model-free "
                                    "for the activation audit when the model fits in memory)"}
            (tmp / "fp16_audit.json").write_text(json.dumps(audit, indent=1))
            report.update({"ok": not bad, "weights_total": audit["weights_total"]})
        quant = {"scheme": str(scheme), "algo": "cast", "report": report}
        meta = {"format": "plain", **wq_meta(quant, recipe, layers={}), **(extra or {}),
                "size_bytes": {"before": reader.total_bytes(), "after": writer.total}}
        (tmp / WQ_JSON).write_text(json.dumps(meta, indent=2, default=str))
    return {"report": report, "dirs": [output]}
