"""Sizes known before any weight is loaded: each tensor of the model, and the checkpoint a scheme will write.

Two sources, no weights read from either:
- `model_tensors(path)`: every tensor's shape, dtype and bytes, from the safetensors headers of a local
  model directory (wq.loading.headers), or, when no weights are local (a Hub id whose config.json is cached), from
  the model built on the meta device from its config. Per decoder block too (`block_bytes`), which is what
  a block-by-block pipeline holds at a time.
- `estimate_checkpoint(path, scheme, ...)`: the bytes the quantized checkpoint will take on disk. Which
  Linears are quantized with which scheme comes from the same planning code the run uses (wq.nn.plan_layers,
  on the meta-device model), so --skip/--override/lm_head count as they will.

What a quantized Linear stores (GPTQ-style tensors; compressed-tensors and auto_round are within a few bytes
per row of it): qweight int32 [ceil(in/32)*b, out], qzeros int32 [n_groups, ceil(out/32)*b], scales fp16
[n_groups, out], g_idx int32 [in]. FP8: weight 1 byte per element + an fp32 scale per group. Everything
else is written in the dtype the CLI loads the model in (bf16).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..loading.headers import TensorInfo, check_shards, shard_files
from ..loading.source import TOKENIZER_FILES
from ..scheme import QuantScheme

log = logging.getLogger(__name__)

BLOCK_RE = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj.weight" -> "model.layers.3"
TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
SMALL_FILES_BYTES = 1024**2  # config.json, generation_config.json, wq.json, index


@dataclass
class SizeEstimate:
    checkpoint_bytes: int  # all the files of one output directory (every --format summed)
    source_bytes: int  # the model's tensors as stored in its files (or its config's dtype)
    quantized_layers: int
    quantized_bytes: int  # packed tensors of the quantized Linears, one format
    kept_bytes: int  # everything else, one format
    formats: int = 1
    block_bytes: dict[str, int] = field(default_factory=dict)  # source bytes per decoder block

    @property
    def largest_block_bytes(self) -> int:
        return max(self.block_bytes.values(), default=0)


def packed_linear_bytes(out_features: int, in_features: int, scheme: QuantScheme) -> int:
    """Bytes of one quantized Linear's checkpoint tensors (bias excluded)."""
    if scheme.is_cast:
        return out_features * in_features * 2
    ng = scheme.n_groups(in_features)
    if scheme.is_fp8:
        return out_features * in_features + ng * out_features * 4
    b = scheme.bits
    qweight = -(-in_features // 32) * b * out_features * 4
    qzeros = ng * -(-out_features // 32) * b * 4
    return qweight + qzeros + ng * out_features * 2 + in_features * 4


def block_of(name: str) -> str | None:
    m = BLOCK_RE.match(name)
    return m.group(1) if m else None


def _config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def meta_model(path_or_config):
    """The model built from its config on the meta device: every module and shape, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    cfg = _config(path_or_config) if isinstance(path_or_config, str | os.PathLike) else path_or_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _meta_tensors(model, dtype: torch.dtype | None) -> dict[str, TensorInfo]:
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        size = torch.empty((), dtype=dt).element_size()
        out[name] = TensorInfo(name, TORCH_TO_ST.get(dt, str(dt)), tuple(t.shape), t.numel() * size, "")
    return out


def _config_dtype(cfg) -> torch.dtype:
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.bfloat16
    dt = getattr(torch, dt) if isinstance(dt, str) else dt
    return dt if isinstance(dt, torch.dtype) else torch.bfloat16


def model_tensors(path: str | os.PathLike, model=None) -> dict[str, TensorInfo]:
    """Every tensor of the model at `path`: from its safetensors headers when they are local, else from the
    meta-device model of its config (parameters and buffers, in the config's dtype). No weights are read."""
    if Path(path).is_dir() and shard_files(path):
        return check_shards(path)
    model = model if model is not None else meta_model(str(path))
    return _meta_tensors(model, _config_dtype(model.config))


def block_bytes(tensors: dict[str, TensorInfo]) -> dict[str, int]:
    """Bytes per decoder block ("model.layers.3": ...), in file order of the block names."""
    out: dict[str, int] = {}
    for t in tensors.values():
        b = block_of(t.name)
        if b is not None:
            out[b] = out.get(b, 0) + t.nbytes
    return out


def _fused_experts(model, planned: dict, skip: Iterable[str]) -> dict[str, tuple[int, int, int]]:
    """3-D expert parameters ([experts, out, in], transformers' fused MoE modules) not already planned as Linears
    and not skipped: {param name: (experts, out, in)}."""
    skip_res = [re.compile(p) for p in skip]
    out = {}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if p.dim() == 3 and "expert" in name and owner not in planned and not any(r.search(owner) for r in skip_res):
            e, o, i = p.shape
            # a fused gate_up is written as separate gate and up projections (the Hub's per-expert names)
            out[name] = (2 * e, o // 2, i) if "gate_up" in name else (e, o, i)
    return out


def estimate_checkpoint(path: str | os.PathLike, scheme: QuantScheme | str, *, skip: Iterable[str] = ("lm_head",),
                        override: Iterable[str] | dict | None = None, formats: int = 1,
                        dtype: torch.dtype = torch.bfloat16, model=None) -> SizeEstimate:
    """Bytes the checkpoint of `scheme` will take on disk for the model at `path` (a local directory or a Hub
    id whose config is cached). formats: how many --format directories are written (each a full copy)."""
    from ..nn import plan_layers

    scheme = QuantScheme.parse(scheme)
    model = model if model is not None else meta_model(str(path))
    tensors = model_tensors(path, model)
    dt_size = torch.empty((), dtype=dtype).element_size()
    if scheme.is_cast:
        planned: dict[str, QuantScheme] = {}
        dt_size = 2
    else:
        planned, _ = plan_layers(model, scheme, skip=skip, override=override)
    quantized = kept = 0
    owners = set(planned)
    for name, mod in model.named_modules():
        if name in planned:
            quantized += packed_linear_bytes(mod.out_features, mod.in_features, planned[name])
    fused = {} if scheme.is_cast else _fused_experts(model, planned, skip)
    for e, o, i in fused.values():
        quantized += e * packed_linear_bytes(o, i, scheme)
    persistent = set(model.state_dict())  # non-persistent buffers (rotary tables) are not written
    stored = dict(model.named_parameters())  # a tied weight once, as the save path stores it
    stored.update((n, b) for n, b in model.named_buffers() if n in persistent)
    for name, t in stored.items():
        owner, _, leaf = name.rpartition(".")
        if (owner in owners and leaf == "weight") or name in fused:
            continue
        kept += t.numel() * (dt_size if t.is_floating_point() else t.element_size())
    extra = SMALL_FILES_BYTES + _tokenizer_bytes(path)
    return SizeEstimate(checkpoint_bytes=formats * (quantized + kept + extra),
                        source_bytes=sum(t.nbytes for t in tensors.values()),
                        quantized_layers=len(planned) + sum(e for e, _, _ in fused.values()),
                        quantized_bytes=quantized, kept_bytes=kept, formats=formats, block_bytes=block_bytes(tensors))


def _tokenizer_bytes(path) -> int:
    d = Path(path)
    if not d.is_dir():
        return 32 * 1024**2  # a Hub model's tokenizer files: generous
    return sum((d / f).stat().st_size for f in TOKENIZER_FILES if (d / f).is_file())


def calibration_bytes(model_or_config, *, nsamples: int, seqlen: int, block_algo: bool) -> int:
    """Disk the resume directory of a calibrated run holds beside the output at its peak: the fp32 activations
    between two blocks (one set, two for block algorithms that carry a full-precision stream), written before
    the previous set is deleted. The finished blocks it also holds are about the checkpoint's size."""
    cfg = getattr(model_or_config, "config", model_or_config)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "d_model", 0) or 0)
    ctx = getattr(cfg, "max_position_embeddings", None)
    seqlen = min(seqlen, ctx) if ctx else seqlen
    streams = 2 if block_algo else 1
    return 2 * streams * nsamples * seqlen * hidden * 4


def peak_disk_bytes(path: str | os.PathLike, scheme: QuantScheme | str, *, skip: Iterable[str] = ("lm_head",),
                    override: Iterable[str] | dict | None = None, formats: int = 1,
                    calibration: tuple[int, int, bool] | None = None, staged: bool = False) -> int:
    """Disk a run writes at its peak: the checkpoint (every format), plus the resume directory <out>.partial beside
    it until the checkpoint is complete: the finished blocks (about one checkpoint) when a calibrated or a streamed
    (`staged`) run keeps them there, and for a calibrated run (calibration = (nsamples, seqlen, block_algo)) the
    activations between two blocks."""
    model = meta_model(str(path))
    est = estimate_checkpoint(path, scheme, skip=skip, override=override, formats=formats, model=model)
    total = est.checkpoint_bytes
    if staged or calibration is not None:
        total += est.quantized_bytes + est.kept_bytes
    if calibration is not None:
        nsamples, seqlen, block_algo = calibration
        total += calibration_bytes(model, nsamples=nsamples, seqlen=seqlen, block_algo=block_algo)
    log.debug("estimated peak disk use %.1f MB (checkpoint %.1f MB)", total / 2**20, est.checkpoint_bytes / 2**20)
    return total
