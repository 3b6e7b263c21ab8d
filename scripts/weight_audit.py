"""Weights-only FP16 + FP8 audit of the bundled model (docs/fp16.md): PYTHONPATH=. python scripts/weight_audit.py

No forward pass: wq.fp16_audit.audit_weights (FP16 columns) and audit_fp8_weights (FP8, FP8G64,
FP8-e5m2) on the BF16 model, then the timed model.to(float16). Writes weights_audit.json.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM

from wq.assets import resolve_model
from wq.fp16_audit import Fp16Audit, audit_fp8_weights, audit_weights


def main() -> None:
    model = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.bfloat16)
    weights = audit_weights(model)
    fp8 = {s: audit_fp8_weights(model, s) for s in ("FP8", "FP8G64", "FP8-e5m2")}
    t = time.perf_counter()
    model.to(torch.float16)
    audit = Fp16Audit(weights=weights, convert_seconds=time.perf_counter() - t, fp8=fp8)
    print(audit.table(top=12))
    audit.save("weights_audit.json")


if __name__ == "__main__":
    main()
