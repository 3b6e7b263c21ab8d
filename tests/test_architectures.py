"""Every decoder family in the installed transformers, dense, Conv1D and fused-expert MoE, through the
whole path: quantize (rtn / gptq / autoround at W4G128), coverage >= 99% of the decoder blocks' weights,
save -> wq.load with logits equal to the in-memory quantized model (reference kernel), and an output
close to the unquantized model's."""

from __future__ import annotations

import pytest
import torch
import zoo

import wq
from wq.nn import QuantExperts, QuantLinear

ALGOS = {"rtn": {}, "gptq": {"nsamples": 4, "seqlen": 16, "batch_size": 2},
         "autoround": {"nsamples": 4, "seqlen": 16, "batch_size": 2, "iters": 2}}


def _calib():
    return torch.randint(0, zoo.V, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("arch", list(zoo.ARCHS))
def test_quantize_save_reload(arch, algo, tmp_path):
    model = zoo.build(arch)
    ids = torch.randint(0, zoo.V, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp = model(ids, labels=ids)
    report = wq.quantize_model(model, "W4G128", algo=algo, calib=_calib(), progress=False, **ALGOS[algo])
    cov = report.coverage
    assert cov["blocks_share"] >= 0.99, cov["kept_in_blocks"]
    if arch in zoo.MOE:
        assert cov["experts"]["quantized"] > 0 and cov["experts"]["kept"] == 0
        assert any(isinstance(m, QuantExperts) for m in model.modules())
    with torch.no_grad():
        out = model(ids, labels=ids)
    q = out.logits
    rel = ((q - fp.logits).norm() / fp.logits.norm()).item()
    assert 0 < rel < 0.6, rel  # changed by quantization (MoE: some tokens change experts), still the same model
    assert abs(out.loss.item() / fp.loss.item() - 1) < 0.05
    wq.save(model, tmp_path / "ckpt", format="wq")
    back = wq.load(tmp_path / "ckpt")
    assert sum(isinstance(m, QuantLinear) for m in back.modules()) == len(report.layers)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q)
