"""The end of a streamed run: the staged parts (one safetensors file per finished decoder block plus the
tensors outside the blocks, in module names) become one checkpoint directory per requested format.

Staging (`<output>.partial/`, also what --resume continues from):
    block_NNNN.safetensors   a finished block's state dict (keys relative to the block)
    outside.safetensors      everything outside the blocks (embeddings, norm, head; tied tensors once)
    state.json               the commit point: finished blocks, per-layer reports

Two passes over the staged files: the first collects each quantized layer's summary (what
Format.prepare decides from, e.g. GPTQ v1 vs v2), the second converts and writes, per format, one
layer (or one plain tensor) in memory at a time: read from its part, converted, written to disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..fp8 import Fp8Weight
from ..loading.shards import ShardFile
from ..packing import PackedWeight
from ..scheme import QuantScheme
from .checkpoint import FormatWriter

log = logging.getLogger(__name__)

_INT_KEYS = ("qweight", "scales", "zeros", "g_idx", "bias")
_FP8_KEYS = ("weight", "weight_scale", "bias")


def staged_parts(staging: Path, prefix: str, n_blocks: int) -> Iterator[tuple[str, Path]]:
    """(key prefix, file) of every staged part, outside first."""
    yield "", staging / "outside.safetensors"
    for i in range(n_blocks):
        yield f"{prefix}.{i}.", staging / f"block_{i:04d}.safetensors"


def _split(sd: dict[str, torch.Tensor], key_prefix: str, schemes: dict[str, QuantScheme],
           shapes: dict[str, tuple[int, int]]):
    """A staged part -> (plain tensors by full key, {layer: PackedWeight | Fp8Weight}, {layer: bias})."""
    plain, packed, biases = {}, {}, {}
    owners: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        full = key_prefix + k
        owner, _, leaf = full.rpartition(".")
        if owner in schemes:
            owners.setdefault(owner, {})[leaf] = t
        else:
            plain[full] = t
    for name, parts in owners.items():
        scheme = schemes[name]
        n_in, n_out = shapes[name]
        if scheme.is_fp8:
            packed[name] = Fp8Weight(weight=parts["weight"], scale=parts["weight_scale"], scheme=scheme,
                                     in_features=n_in, out_features=n_out)
        else:
            packed[name] = PackedWeight(qweight=parts["qweight"], scales=parts["scales"], zeros=parts["zeros"],
                                        scheme=scheme, in_features=n_in, out_features=n_out, g_idx=parts.get("g_idx"))
        if parts.get("bias") is not None:
            biases[name] = parts["bias"]
    return plain, packed, biases


def _by_layer(keys: list[str], key_prefix: str, schemes: dict[str, QuantScheme]) -> list[list[str]]:
    """A part's keys in groups read together: the tensors of one quantized layer, or one plain tensor."""
    layers: dict[str, list[str]] = {}
    out: list[list[str]] = []
    for k in keys:
        owner = (key_prefix + k).rpartition(".")[0]
        if owner in schemes:
            if owner not in layers:
                layers[owner] = []
                out.append(layers[owner])
            layers[owner].append(k)
        else:
            out.append([k])
    return out


def _summaries(parts, schemes, shapes) -> dict:
    out = {}
    for key_prefix, file in parts:
        with safe_open(str(file), "pt") as f:
            wanted = [k for k in f.keys() if (key_prefix + k).rpartition(".")[0] in schemes]
            sd = {k: f.get_tensor(k) for k in wanted if k.rpartition(".")[2] in ("zeros", "g_idx")}
            for k in wanted:  # codes and scales: shapes only
                if k not in sd:
                    sl = f.get_slice(k)
                    dtype = {"I32": torch.int32, "F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16,
                             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8}
                    sd[k] = torch.empty(sl.get_shape(), dtype=dtype.get(sl.get_dtype(), torch.float32), device="meta")
        _, packed, _ = _split(sd, key_prefix, schemes, shapes)
        out.update({n: (pw.summary() if isinstance(pw, PackedWeight) else pw) for n, pw in packed.items()})
    return out


def assemble(parts: list[tuple[str, Path]], targets: dict[str, Path], *, names, schemes: dict[str, QuantScheme],
             shapes: dict[str, tuple[int, int]], config: dict, quant: dict, unquantized: list[str], tokenizer=None,
             generation_config=None, recipe=None, extra=None, max_bytes: int | None = None,
             summaries: dict | None = None) -> None:
    """Write one checkpoint per format ({format name: directory}) from staged parts [(key prefix, file)].
    names: HubNames (or anything with to_hub / hub_module); summaries: the layers' summaries when the
    caller collected them while staging (else a first pass over the parts reads them)."""
    from ..formats import FORMATS

    missing = [str(f) for _, f in parts if not f.exists()]
    if missing:
        raise FileNotFoundError(f"staged parts missing: {missing[:3]} (the run did not finish; rerun with --resume)")
    summaries = summaries if summaries is not None else _summaries(parts, schemes, shapes)
    for fmt_name, target in targets.items():
        target.mkdir(parents=True, exist_ok=True)
        kw = {} if max_bytes is None else {"max_bytes": max_bytes}
        writer = FormatWriter(target, FORMATS.get(fmt_name)(), names, summaries, **kw)
        for key_prefix, file in parts:
            part = ShardFile(file)
            for keys in _by_layer(part.keys(), key_prefix, schemes):
                # plain tensors (embeddings, norms) are copied file to file (StoredTensor), never read into memory
                sd = {k: part.get(k) if (key_prefix + k).rpartition(".")[0] in schemes else part.stored(k) for k in keys}
                plain, packed, biases = _split(sd, key_prefix, schemes, shapes)
                writer.add(plain, packed, biases)
            part.close()
        writer.finish(config, quant, unquantized=unquantized, tokenizer=tokenizer,
                      generation_config=generation_config, recipe=recipe, extra=extra)
        log.info("wrote %s (%s)", target, fmt_name)
