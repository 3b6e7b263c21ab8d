"""Loading the models to compare, naming them, and what they cost in bits per weight.

A quantized checkpoint (a directory with `wq.json` or a `quantization_config`) goes through `wq.load`;
anything else (a hub id, a plain HF directory, "default" for the bundled model) through transformers.
Both are loaded in the one dtype the run records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPUs (what users serve), fp32 on CPUs (no native bf16 here; bf16 matmul is slow)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(name: str | torch.dtype | None, device) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


def resolve(spec: str, revision: str | None = None) -> str:
    """The directory or Hub id to load: "default" is the bundled model; a path-like argument that does not exist,
    broken shards or an unreachable Hub fail here in one line (wq.loading.source.ModelSourceError / ShardError)."""
    from wq.loading.source import resolve_source

    return resolve_source(spec, revision).path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def quant_info(path: str) -> dict | None:
    """{"scheme", "quant_method"} of a quantized checkpoint directory (wq.json / config.json), None for a
    plain one."""
    p = Path(path)
    if not p.is_dir():
        return None
    qc = _read_json(p / "config.json").get("quantization_config") or {}
    meta = _read_json(p / "wq.json")
    if not qc and not meta:
        return None
    scheme = meta.get("scheme")
    if scheme is None and qc.get("bits") is not None:
        g = qc.get("group_size", -1)
        scheme = f"W{qc['bits']}G{g}"
    return {"scheme": scheme, "quant_method": qc.get("quant_method"), "format": meta.get("format"),
            "algo": meta.get("algo") or (qc.get("quant_method") if not meta else None)}


def bits_per_weight(model) -> float | None:
    """Storage per weight over the quantized Linears of a loaded model (codes + fp16 scale and zero per
    group, partial last groups counted whole; `QuantScheme.bits_per_weight`); None if none is quantized."""
    try:
        from wq.io import packed_layers
    except ImportError:
        return None
    total_bits, total_w = 0.0, 0
    for pw in packed_layers(model).values():
        n = pw.in_features * pw.out_features
        total_bits += pw.scheme.bits_per_weight(pw.in_features) * n
        total_w += n
    return total_bits / total_w if total_w else None


RESERVED = ("baseline", "deltas", "settings", "versions", "models", "schema")


def model_name(spec: str, info: dict | None, taken: set[str]) -> str:
    """The quantized model's name in the report: its directory and algorithm, "w4g128 (gptq)". A directory name
    already taken gets its parent's in front ("a/w4 (rtn)", "b/w4 (rtn)"), then a number."""
    algo = (info or {}).get("algo")
    parts = Path(str(spec).rstrip("/")).parts or (str(spec),)
    suffix = f" ({algo})" if algo else ""
    for depth in range(1, len(parts) + 1):
        name = "/".join(parts[-depth:]) + suffix
        if name not in taken and name not in RESERVED:
            return name
    base, i = "/".join(parts) + suffix, 2
    while f"{base}-{i}" in taken:
        i += 1
    return f"{base}-{i}"


def fingerprint(spec: str, revision: str | None = None) -> str:
    """Identifies the weights of a model for the result cache: a local directory by its weight, config and
    tokenizer files' names, sizes and mtimes (not wq.json, which --eval rewrites with the results); a hub id by id
    and revision."""
    p = Path(spec)
    if p.is_dir():
        h = hashlib.sha256(str(p.resolve()).encode())
        for f in sorted(p.iterdir()):
            if f.name == "wq.json":
                continue
            if f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt") and f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]
    return f"{spec}@{revision or 'main'}"


def load_model(spec: str, *, device, dtype: torch.dtype, revision: str | None = None):
    """(model, tokenizer_or_None, info) for a hub id, a directory or "default"; eval mode, on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(spec)
    info = quant_info(path)
    if info is not None:
        import wq

        if not hasattr(wq, "load"):
            raise RuntimeError(f"{path} is a quantized checkpoint but this wq has no wq.load; update wq")
        model = wq.load(path, device=str(device), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision)
        model.to(device)
    model.eval()
    tok = None
    if os.path.isdir(path) and any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(path)
    elif not os.path.isdir(path):
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
    return model, tok, info


QUANT_FORWARDS = ("auto", "dequantized", "kernels")


def resolve_quant_forward(mode: str, device) -> str:
    """"auto": the packed kernels on GPUs (what users serve), dequantized weights on CPUs (same numbers as
    the reference kernel, computed once per layer instead of on every forward)."""
    if mode not in QUANT_FORWARDS:
        raise ValueError(f"quant_forward {mode!r}: choose from {', '.join(QUANT_FORWARDS)}")
    if mode == "auto":
        return "kernels" if torch.device(device).type == "cuda" else "dequantized"
    return mode


@torch.no_grad()
def dequantize_linears(model, dtype: torch.dtype) -> dict:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight in `dtype`: exactly the
    reference kernel's math (`F.linear(x, dequant(W).to(x.dtype), b)`). Returns {name: QuantLinear} of
    the replaced modules, for `restore_linears`."""
    from torch import nn

    from wq.nn import QuantLinear, set_module

    replaced = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear):
            continue
        w = mod.packed.dequantize(torch.float32).to(dtype)
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device, dtype=dtype)
        lin.weight.copy_(w)
        if mod.bias is not None:
            lin.bias.copy_(mod.bias.to(dtype))
        set_module(model, name, lin)
        replaced[name] = mod
    return replaced


def restore_linears(model, replaced: dict) -> None:
    """Undo `dequantize_linears` (for a model the caller still owns, e.g. before wq.save)."""
    from wq.nn import set_module

    for name, mod in replaced.items():
        set_module(model, name, mod)
