"""Save and load quantized checkpoints: safetensors shards + config.json + wq.json, written atomically.

Layout of OUT (one format per directory; several formats write OUT/<format>/):
    config.json                  the model config with `quantization_config` (the format's keys)
    model.safetensors            or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    wq.json                      recipe, versions, per-layer schemes, the quantization report
    tokenizer files, generation_config.json when given
Everything is written to a temporary sibling directory that is renamed into place at the end, so an
interrupted or failed save never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .formats import FORMATS
from .formats.fp8 import default_fp8_format, float_format_name
from .fp8 import FP8_DTYPES
from .loading.headers import check_shards, shard_files
from .nn import QuantExperts, QuantLinear, linear_shape, set_module
from .nn import compact as compact_layers
from .nn.experts import find_fused_experts, fused_layout
from .nn.hub_names import HubNames
from .packing import PackedWeight
from .scheme import QuantScheme
from .writing.checkpoint import WQ_JSON, FormatWriter, versions, wq_meta  # noqa: F401  (re-exported)
from .writing.output import check_not_working_dir, occupied, swap_in
from .writing.shards import MAX_SHARD_BYTES, ShardWriter

log = logging.getLogger(__name__)



def default_format(scheme: QuantScheme | str) -> str:
    """The format that gives the user fast kernels in vLLM for this scheme.

    4/8-bit symmetric integer: gptq (Marlin/Machete). Anything else: compressed-tensors where it is
    available (vLLM's route for 2/3-bit and asymmetric weights), else wq's native format.
    """
    s = QuantScheme.parse(scheme)
    if s.is_fp8:
        return default_fp8_format(s)
    if s.is_int and s.sym and s.bits in (4, 8):
        return "gptq"
    return "compressed-tensors" if "compressed-tensors" in FORMATS else "wq"


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to write into; on success it is swapped in (an old `out` is renamed aside
    and deleted only after: wq.writing.output.swap_in), on any failure (full disk, Ctrl-C) it is removed: never a
    half-written directory that looks done, never the old and the new one both lost."""
    check_not_working_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the checkpoint is not
    try:
        yield tmp
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------ save


def save(model: nn.Module, out: str | os.PathLike, format: str | list[str] | None = None, *, tokenizer=None,
         config: Any = None, overwrite: bool = False, extra: dict | None = None) -> list[Path]:
    """Write `model` (quantized in place by wq.quantize_model) to `out`. Returns the directories written.

    format: a registered format name or a list of them (None: default_format of the main scheme).
    config: the QuantConfig of the run (stored in wq.json as the recipe); extra: more wq.json keys.
    """
    quant = getattr(model, "wq_quant", None)
    if quant is None:
        raise ValueError("model has no wq quantization: run wq.quantize_model(model, scheme) first")
    if QuantScheme.parse(quant["scheme"]).is_cast:
        from .cast import save_cast

        return save_cast(model, out, tokenizer=tokenizer, config=config, overwrite=overwrite, extra=extra)
    budget_fmt = (quant.get("bits_budget") or {}).get("format")  # the format whose bits the budget counted
    formats = [format] if isinstance(format, str) else list(format or [budget_fmt or default_format(quant["scheme"])])
    formats = [float_format_name(f, quant["scheme"]) for f in formats]
    formats = list(dict.fromkeys(formats))
    for name in formats:
        fmt = FORMATS.get(name)()
        for layer, s in quant["layers"].items():
            reason = fmt.why_not(QuantScheme.parse(s))
            if reason:
                raise ValueError(f"format {name!r} cannot store layer {layer} ({s}): {reason}")
    out = Path(out)
    if occupied(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) or choose another -o")
    written = []
    with atomic_dir(out) as tmp:
        for name in formats:
            target = tmp / name if len(formats) > 1 else tmp
            target.mkdir(parents=True, exist_ok=True)
            _write_one(model, target, FORMATS.get(name)(), quant, tokenizer, config, extra)
            written.append(out / name if len(formats) > 1 else out)
    for d in written:
        log.info("wrote %s (%s)", d, json.loads((d / "config.json").read_text())["quantization_config"]
                 ["quant_method"])
    return written


def _write_one(model, target: Path, fmt, quant, tokenizer, config, extra) -> None:
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    packed = {n: m.packed for n, m in qmods.items()}
    writer = FormatWriter(target, fmt, HubNames(model), packed)
    state = {k: t for k, t in model.state_dict().items() if k.rpartition(".")[0] not in qmods}
    writer.add(_drop_tied(model, state), packed, {n: m.bias for n, m in qmods.items() if m.bias is not None})
    writer.finish(model.config.to_dict(), quant,
                  unquantized=[n for n, m in model.named_modules() if isinstance(m, nn.Linear)],
                  tokenizer=tokenizer, generation_config=getattr(model, "generation_config", None), recipe=config,
                  extra=extra)


def _drop_tied(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights (lm_head = embed_tokens) are stored once, as transformers does."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen[ident] = key
        out[key] = t
    return out


def _write_shards(state: dict[str, torch.Tensor], target: Path, max_bytes: int = MAX_SHARD_BYTES) -> None:
    writer = ShardWriter(target, max_bytes)
    writer.add_many(state)
    writer.close()


# ------------------------------------------------------------------------------------------ load


def read_state(path: Path) -> dict[str, torch.Tensor]:
    files = shard_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no model.safetensors (or index) found; is this a wq checkpoint?")
    check_shards(path, files)  # headers only: a truncated file or missing shard is named before any read
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _empty_model(config, dtype):
    """The model's skeleton: parameters on the meta device (no memory), buffers (rotary tables) real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _unfuse_for(model: nn.Module, module_keys) -> None:
    """Give fused experts modules whose checkpoint tensors are per expert their QuantExperts form."""
    per_expert = {k.rsplit(".", 3)[0] for k in module_keys if re.search(r"\.\d+\.[^.]+\.[^.]+$", k)}
    for path, mod in find_fused_experts(model).items():
        if path in per_expert and fused_layout(mod) is not None:
            set_module(model, path, QuantExperts.empty(mod, device="meta"))


def load(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         *, compact: bool = False):
    """Rebuild a quantized model from any directory wq writes. Returns the model (eval mode).

    device: where to put it (default cpu); dtype: dtype of the unquantized parameters and activations
    (default: the checkpoint's own). compact: on CPU, keep only the CPU kernels' layout of each quantized
    weight and free the checkpoint tensors (about half the weight memory; see QuantLinear.compact_).
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").exists():
        subdirs = [d.name for d in path.iterdir() if (d / "config.json").exists()] if path.is_dir() else []
        hint = f"; it holds formats {subdirs}: load {path}/<format>" if subdirs else ""
        raise FileNotFoundError(f"{path}: no config.json{hint}")
    raw = json.loads((path / "config.json").read_text())
    qconfig = raw.get("quantization_config") or {}
    method = qconfig.get("quant_method")
    if method is None:  # a plain checkpoint (wq's BF16/FP16 casts write these)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
        meta = json.loads((path / WQ_JSON).read_text()) if (path / WQ_JSON).exists() else {}
        model.wq_quant = {"scheme": meta.get("scheme", "BF16"), "algo": "cast", "algo_args": {}, "layers": {},
                          "report": meta.get("report")}
        return model.eval().to(device or "cpu")
    fmt = next((FORMATS.get(n)() for n in FORMATS if FORMATS.get(n)().reads(qconfig)), None)
    if fmt is None:
        raise ValueError(f"{path}: quant_method {method!r} is not one wq reads ({', '.join(FORMATS.names())})")
    meta = json.loads((path / WQ_JSON).read_text()) if (path / WQ_JSON).exists() else {}
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # wq builds the quantized modules itself
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = _empty_model(config, dtype)
    names = HubNames(model)
    hub_state = read_state(path)
    hub_qnames = sorted({k.rsplit(".", 1)[0] for k, t in hub_state.items() if k.endswith((".qweight", ".weight_packed"))
                         or (k.endswith(".weight") and t.dtype in FP8_DTYPES.values())})
    hub_schemes = ({n: QuantScheme.parse(meta["layers"][n]) for n in hub_qnames} if meta.get("layers")
                   else fmt.layer_schemes(qconfig, hub_qnames))
    state = {names.from_hub(k): t for k, t in hub_state.items()}
    del hub_state
    schemes = {names.module_of(n): s for n, s in hub_schemes.items()}
    _unfuse_for(model, state)
    for name in sorted(schemes):
        shape = linear_shape(model.get_submodule(name))
        if shape is None:
            raise ValueError(f"{path}: {name} holds quantized tensors but is a "
                             f"{type(model.get_submodule(name)).__name__} in this model, not a Linear")
        suffixes = {k[len(name) + 1:]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name}
        pw = fmt.read_layer(suffixes, schemes[name], shape[0], shape[1], qconfig)
        bias = suffixes.get("bias")
        set_module(model, name, QuantLinear.from_packed(pw, None if bias is None else bias.to(dtype)))
        for k in list(suffixes):
            state.pop(f"{name}.{k}")
    want = {k: v.dtype for k, v in model.state_dict().items()}  # the skeleton's dtypes (fp32 routers stay fp32)
    state = {k: (t.to(want[k]) if k in want and t.is_floating_point() and t.dtype != want[k] else t)
             for k, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    qbuffers = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in qbuffers]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing or unexpected or still_meta:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {(missing or still_meta)[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.wq_quant = {"scheme": meta.get("scheme") or str(next(iter(schemes.values()))),
                      "algo": meta.get("algo", "unknown"), "algo_args": (meta.get("recipe") or {}),
                      "layers": {n: str(s) for n, s in schemes.items()}, "report": meta.get("report"),
                      "coverage": meta.get("coverage")}
    model.eval().to(device or "cpu")
    if compact:
        done, kept = compact_layers(model)
        log.info("compact: %d quantized layers keep only the CPU kernel layout, %d unchanged", done, kept)
    return model


def packed_layers(model: nn.Module) -> dict[str, PackedWeight]:
    return {n: m.packed for n, m in model.named_modules() if isinstance(m, QuantLinear)}
