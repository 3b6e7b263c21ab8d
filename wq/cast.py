"""Plain casts (BF16, FP16): audit, convert, and save a checkpoint plain transformers loads.

    audit = wq.cast_model(model, "FP16", calib=ids)   # audits, refuses on inf unless force, converts
    wq.save(model, "out", tokenizer=tok)              # plain FP16 safetensors + wq.json + fp16_audit.json

The FP16 audit (wq/fp16_audit.py) runs on the model *before* conversion: weights as stored, and
activations from a short pass of the unconverted model (upcast to fp32 on CPU, which has no native
BF16 math; the round trip BF16 -> FP32 -> BF16 is exact).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .fp16_audit import Fp16Audit, activation_amax, audit_fp8_weights, audit_weights, check_writable
from .scheme import QuantScheme

log = logging.getLogger(__name__)

AUDIT_JSON = "fp16_audit.json"
CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def calib_ids(tokenizer, text: str, nsamples: int = 32, seqlen: int = 512) -> Tensor:
    """[n, seqlen] token ids: consecutive windows from the start of `text` (n <= nsamples)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(nsamples, ids.numel() // seqlen)
    if n == 0:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def audit_fp16(model: nn.Module, calib: Tensor | list[Tensor] | None = None,
               fp8_schemes: tuple[str, ...] = ()) -> Fp16Audit:
    """Audit of an FP16 conversion of `model` (unchanged on return). calib: token ids for activations."""
    audit = Fp16Audit(weights=audit_weights(model, torch.float16))
    for s in fp8_schemes:
        audit.fp8[str(QuantScheme.parse(s))] = audit_fp8_weights(model, s)
    if calib is not None:
        dtype = next(model.parameters()).dtype
        upcast = dtype != torch.float32 and next(model.parameters()).device.type == "cpu"
        if upcast:
            model.float()
        try:
            t = time.perf_counter()
            audit.activations = activation_amax(model, calib)
            n = len(calib) if isinstance(calib, list) else calib.shape[0]
            shape = tuple(calib[0].shape) if isinstance(calib, list) else tuple(calib.shape)
            audit.calib = {"batches": n, "shape": shape, "dtype": "float32" if upcast else str(dtype),
                           "seconds": round(time.perf_counter() - t, 2)}
        finally:
            if upcast:
                model.to(dtype)
    return audit


def cast_model(model: nn.Module, scheme: QuantScheme | str = "FP16", *, calib: Tensor | list[Tensor] | None = None,
               force: bool = False, fp8_schemes: tuple[str, ...] = ("FP8",)) -> Fp16Audit | None:
    """Convert `model` in place to BF16 or FP16. For FP16 the audit comes first; Fp16OverflowError
    (nothing converted) if it finds values that become inf, unless `force`. Returns the audit (FP16)."""
    scheme = QuantScheme.parse(scheme)
    if not scheme.is_cast:
        raise ValueError(f"{scheme} is not a cast; cast_model takes BF16 or FP16 (wq.quantize_model quantizes)")
    audit = None
    if scheme.fmt == "fp16":
        audit = audit_fp16(model, calib, fp8_schemes)
        check_writable(audit, force)
        if not audit.ok:
            log.warning("--force: writing FP16 although %d value group(s) become inf", len(audit.problems()))
    t = time.perf_counter()
    model.to(CAST_DTYPES[scheme.fmt])
    seconds = time.perf_counter() - t
    if audit is not None:
        audit.convert_seconds = seconds
    summary = {"convert_seconds": round(seconds, 4)}
    if audit is not None:
        d = audit.to_dict()
        summary.update({k: d[k] for k in ("ok", "weights_total", "max_activation", "problems")})
    model.wq_quant = {"scheme": str(scheme), "algo": "cast", "algo_args": {}, "layers": {}, "report": summary}
    model.wq_audit = audit
    return audit


def save_cast(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, config=None, overwrite: bool = False,
              extra: dict | None = None) -> list[Path]:
    """Write a cast model as a plain checkpoint (no quantization_config) + wq.json (+ fp16_audit.json)."""
    from .io import WQ_JSON, atomic_dir, wq_meta
    from .writing.output import occupied

    quant = model.wq_quant
    out = Path(out)
    if occupied(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) or choose another -o")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        audit = getattr(model, "wq_audit", None)
        if audit is not None:
            audit.save(tmp / AUDIT_JSON)
        meta = {"format": "plain", **wq_meta({**quant, "algo": "cast"}, config, layers={}), **(extra or {})}
        (tmp / WQ_JSON).write_text(json.dumps(meta, indent=2, default=str))
    log.info("wrote %s (plain %s checkpoint)", out, quant["scheme"])
    return [out]
