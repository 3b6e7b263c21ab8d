"""End-to-end scale tuning: only the scales change, the final-state loss drops, the checkpoint round-trips."""

from __future__ import annotations

import copy

import torch

import wq
from wq.algorithms.e2e import e2e_tune_scales, fp_targets
from wq.nn import QuantLinear


def test_scales_only_loss_drops_and_round_trips(tiny_model, tmp_path):
    model = tiny_model.float()
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(test).logits
    targets = fp_targets(model, calib)
    q = copy.deepcopy(model)
    wq.quantize_model(q, "W2G32", algo="rtn", progress=False)
    before = {n: (m.qweight.clone(), m.zeros.clone(), m.scales.clone()) for n, m in q.named_modules()
              if isinstance(m, QuantLinear)}
    with torch.no_grad():
        e0 = float((q(test).logits - ref).pow(2).mean())
    stats = e2e_tune_scales(q, calib, targets, steps=40, lr=1e-2)
    assert stats["e2e_loss_after"] < 0.9 * stats["e2e_loss_before"], stats
    with torch.no_grad():
        e1 = float((q(test).logits - ref).pow(2).mean())
    assert e1 < e0, (e1, e0)  # held-out tokens improve too
    after = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert set(after) == set(before)
    assert all(torch.equal(after[n].qweight, b[0]) and torch.equal(after[n].zeros, b[1]) for n, b in before.items())
    assert any(not torch.equal(after[n].scales, b[2]) for n, b in before.items())
    wq.save(q, tmp_path / "q", format="wq")
    with torch.no_grad():
        torch.testing.assert_close(wq.load(tmp_path / "q")(test).logits, q(test).logits, rtol=1e-4, atol=1e-4)


def test_quantize_model_runs_it_after_the_blocks(tiny_model):
    model = tiny_model.float()
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    rep = wq.quantize_model(model, "W3G32", algo="rtn", calib=calib, nsamples=8, seqlen=32, e2e_steps=8, e2e_lr=1e-2,
                            progress=False)
    assert rep.e2e["e2e_steps"] == 8 and rep.to_dict()["e2e"]["e2e_loss_after"] <= rep.e2e["e2e_loss_before"]
