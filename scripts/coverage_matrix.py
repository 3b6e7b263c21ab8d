"""Share of the decoder blocks' weights quantized per architecture, on tiny random models of every family
in tests/zoo.py (transformers' own config classes), with rtn W4G128, and whether save -> wq.load gives
equal logits. Writes docs/coverage_matrix.md.

    python scripts/coverage_matrix.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("WQ_KERNEL", "reference")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import zoo  # noqa: E402

import wq  # noqa: E402


def main() -> None:
    rows = ["| architecture | blocks quantized | experts quantized | model quantized (embeddings/head incl.) | "
            "kept in blocks | reload logits equal |", "|---|---|---|---|---|---|"]
    for arch in zoo.ARCHS:
        model = zoo.build(arch)
        ids = torch.randint(0, zoo.V, (1, 12), generator=torch.Generator().manual_seed(0))
        rep = wq.quantize_model(model, "W4G128", progress=False)
        cov = rep.coverage
        ex = cov["experts"]
        ex_share = (f"{ex['quantized'] / (ex['quantized'] + ex['kept']):.0%}" if ex["quantized"] + ex["kept"] else "-")
        kept = sorted({r for r in cov["kept_in_blocks"].values()})
        with tempfile.TemporaryDirectory() as d:
            wq.save(model, Path(d) / "c", format="wq")
            back = wq.load(Path(d) / "c")
            with torch.no_grad():
                same = torch.equal(back(ids).logits, model(ids).logits)
        rows.append(f"| {arch} | {cov['blocks_share']:.2%} | {ex_share} | {cov['model_share']:.1%} | "
                    f"{'; '.join(kept) or '-'} | {'yes' if same else 'NO'} |")
        print(rows[-1], flush=True)
    text = ("# Coverage per architecture\n\n`python scripts/coverage_matrix.py` (tiny random models, 2 blocks, hidden 64, "
            "rtn W4G128; the tests in tests/test_architectures.py assert >= 99% for rtn, gptq and autoround)\n\n"
            + "\n".join(rows) + "\n")
    (ROOT / "docs" / "coverage_matrix.md").write_text(text)


if __name__ == "__main__":
    main()
